"""A stage trained from streamed shards (WebDataset tars, datasets' parquet files): the stream's order decides the
samples, two processes train what one does, and a run killed mid-epoch resumes bitwise."""

import json
import re
import threading

import pytest
import torch
from train_common import cli, kill_in_checkpoint_15, losses, run, weights

from unigen.errors import CheckpointError, DataError
from unigen.shapes import write_dataset

pytest.importorskip("webdataset")
pytest.importorskip("datasets")

SPLIT = [(0, 7), (7, 16), (16, 27)]  # three shards of unequal size
LONG = "red " * 600  # more tokens than the smoke model's 512 positions


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """24 Shapes samples, a torn image, a caption too long for the model and a text-only line (passed over by
    stage 1, whose mixture gives text weight 0), as WebDataset tars and as parquet files."""
    import datasets
    import webdataset as wds

    root = tmp_path_factory.mktemp("stream")
    manifest = write_dataset(root / "shapes", 24, seed=3)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    items = [{"image": (manifest.parent / r["image"]).read_bytes(), "caption": r["caption"], "text": None}
             for r in rows]
    items.insert(5, {"image": items[0]["image"][:70], "caption": "a torn image", "text": None})
    items.insert(11, {"image": items[1]["image"], "caption": LONG, "text": None})
    items.insert(20, {"image": None, "caption": None, "text": "a red circle and a blue square"})
    for kind in ("wds", "parquet"):
        (root / kind).mkdir()
    for n, (a, b) in enumerate(SPLIT):
        with wds.TarWriter(str(root / "wds" / f"part-{n}.tar")) as tar:
            for i in range(a, b):
                it = items[i]
                extra = {"png": it["image"], "txt": it["caption"]} if it["text"] is None else \
                    {"json": json.dumps({"text": it["text"]}).encode()}
                tar.write({"__key__": f"{i:05d}", **extra})
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "text": datasets.Value("string")})
    table = datasets.Dataset.from_dict({k: [it[k] if k != "image" or it[k] is None else {"bytes": it[k], "path": None}
                                            for it in items] for k in ("image", "caption", "text")},
                                       features=features)
    for n, (a, b) in enumerate(SPLIT):
        table.select(range(a, b)).to_parquet(str(root / "parquet" / f"part-{n}.parquet"))
    return {"wds": root / "wds", "parquet": root / "parquet"}


def _picks(kind_dir, rank, world, grad_accum=2, steps=8, state=None):
    from unigen.data.bad_samples import BadSamples
    from unigen.data.stream import ShardStream
    from unigen.training.streamed import StreamedPicks

    stream = ShardStream(kind_dir, 6, seed=3, rank=rank, world=world)
    picks = StreamedPicks(stream, (1.0, 0.0, 3.0), seed=3, stage=1, grad_accum=grad_accum, caption_dropout=0.3,
                          bad=BadSamples())
    if state is not None:
        picks.load_state_dict(state)
    first = 0 if state is None else steps // 2
    return picks, [[[(p.task, p.dropped, p.sample.caption, p.sample.image.tobytes()) for p in mb]
                    for mb in picks.step_picks(step)] for step in range(first, steps)]


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_each_process_picks_its_share_of_what_one_process_picks_and_resumes_mid_epoch(shards, kind):
    one, whole = _picks(shards[kind], 0, 1)
    (r0, a), (r1, b) = _picks(shards[kind], 0, 2), _picks(shards[kind], 1, 2)
    assert [[x + y for x, y in zip(sa, sb, strict=True)] for sa, sb in zip(a, b, strict=True)] == whole
    tasks = [p[0] for step in whole for mb in step for p in mb]
    assert {"understanding", "generation"} == set(tasks)  # the text-only line never trains in stage 1
    assert any(p[1] for step in whole for mb in step for p in mb)  # caption dropout drawn per position
    for picks in (one, r0, r1):
        picks.gather_bad()
    reasons = sorted({r["reason"].split(":")[0] for r in one.bad.rows})
    assert reasons == ["unreadable"]  # no check given here: the long caption is kept; the torn image is not
    assert sorted(map(json.dumps, r0.bad.rows + r1.bad.rows)) == sorted(map(json.dumps, one.bad.rows))
    # halfway, mid-epoch: 4 steps x 12 records of 27
    half, _ = _picks(shards[kind], 0, 1, steps=4)
    state = json.loads(json.dumps(half.state_dict()))
    assert state["stream"]["epoch"] == 1 and state["stream"]["offset"] > 0
    _, rest = _picks(shards[kind], 0, 1, state=state)
    assert rest == whole[4:]


GROUPS = "stage1.groups=[aligner,gen_aligner,gen_embed,gen_head,llm]"
COMMON = ("--stage", 1, "stage1.steps=4", GROUPS, "max_bad_fraction=0.2")


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run(cli(*COMMON, f"data={shards['wds']}", "--output-dir", out, "stage1.batch_size=8"))
    return out


@pytest.mark.slow  # real processes (~40 s each); the in-process share-and-resume test runs by default
@pytest.mark.parametrize(("kind", "parallel"), [("wds", "ddp"), ("parquet", "fsdp")])
def test_two_processes_train_what_one_process_trains_from_the_stream(shards, one_process, tmp_path, kind, parallel):
    from test_train_resume import TORCHRUN, _same_run

    # FSDP: a share lacking a task another process has runs its weight-0 stand-in (the same modules everywhere)
    done = run(cli(*COMMON, f"data={shards[kind]}", "--output-dir", tmp_path, "stage1.batch_size=4",
                   f"parallel={parallel}", launcher=TORCHRUN))
    assert f"{parallel}, 2 process(es)" in done.stderr
    _same_run(one_process, tmp_path)  # the parquet shards hold the tars' records: the same run
    bad = [json.loads(x) for x in (tmp_path / "bad_samples.jsonl").read_text().splitlines()]
    assert {r["reason"].split(" row: ")[0].split(":")[0] for r in bad} == {"the understanding", "unreadable"}


@pytest.mark.slow  # real processes (~40 s each); the in-process share-and-resume test runs by default
def test_a_streamed_run_killed_mid_epoch_resumes_bitwise(shards, tmp_path):
    common = ["--stage", "1", f"data={shards['parquet']}", "stage1.steps=20", "stage1.batch_size=4",
              "max_bad_fraction=0.2"]
    run(cli("--output-dir", tmp_path / "a", *common))
    kill_in_checkpoint_15("--output-dir", tmp_path / "b", "--save-every", 5, *common, ready=tmp_path / "in-ckpt-15")
    ckpts = tmp_path / "b" / "stage1" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step_0000015", "step_0000005", "step_0000010"]
    position = json.loads((ckpts / "step_0000010" / "data.json").read_text())["stream"]
    assert position["epoch"] == 1 and position["offset"] > 0  # 40 of 27 records read: mid-epoch, mid-shard
    run(cli("--output-dir", tmp_path / "b", "--save-every", 5, "--resume", "latest", *common))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    wa, wb = weights(tmp_path / "a" / "stage1" / "final"), weights(tmp_path / "b" / "stage1" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    listed = [(tmp_path / x / "bad_samples.jsonl").read_text() for x in ("a", "b")]
    assert listed[0] == listed[1] and len(listed[0].splitlines()) >= 4  # each bad record, each epoch


def test_a_checkpoint_of_other_data_is_named(tmp_path):
    from unigen.training.checkpoints import load_data_state

    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(CheckpointError, match="read streamed shards, but this run reads a manifest; resume with"):
        load_data_state(tmp_path, None)
    (tmp_path / "data.json").unlink()
    with pytest.raises(CheckpointError, match="read a manifest, but this run reads streamed shards"):
        load_data_state(tmp_path, object())


def test_data_names_streamed_shards_by_what_the_path_is(shards, tmp_path):
    from unigen.data.shards import is_streamed, list_shards

    folder = shards["wds"]
    assert list_shards(f"{folder}/part-[02].tar") == [folder / "part-0.tar", folder / "part-2.tar"]
    assert is_streamed(folder) and is_streamed(folder / "part-1.tar") and is_streamed(f"{folder}/*.tar")
    manifest = folder.parent / "shapes" / "train.jsonl"
    assert not is_streamed(manifest) and not is_streamed(manifest.parent)  # a manifest; a folder with no shards
    with pytest.raises(FileNotFoundError, match=r"no shards \(.tar, .parquet, .arrow\) match .*nothing-\*.tar"):
        list_shards(f"{tmp_path}/nothing-*.tar")


# ---- rows named by shard and key, edit records, the run's bad share ------------------------------------------

@pytest.fixture(scope="module")
def stage_model(shards, tmp_path_factory):
    """A fresh smoke model (its tokenizer learnt from the shards' texts) and its recipe."""
    from train_common import recipe

    from unigen.data.stream import text_samples
    from unigen.training.start import build_fresh

    r = recipe(shards["wds"], tmp_path_factory.mktemp("model"))
    return r, *build_fresh(r, list(text_samples(shards["wds"])))


@pytest.mark.parametrize(("kind", "where"), [("wds", "part-1.tar key 00011"), ("parquet", "part-1.parquet row 4")])
def test_a_streamed_row_too_long_is_named_by_its_shard_and_key(shards, stage_model, kind, where):
    from unigen.data.stream import ShardStream
    from unigen.training.streamed import StreamBatchBuilder, sample_check

    r, model, processor = stage_model
    check = sample_check(StreamBatchBuilder(model, processor, r.question, r.max_seq_len), (1.0, 0.0, 3.0))
    stream = ShardStream(shards[kind], 27, check=check)
    next(iter(stream))
    where = str(shards[kind] / where)
    long = [row for row in stream.bad.rows if "max_seq_len" in row["reason"]]
    assert [row["sample"] for row in long] == [where]
    assert re.fullmatch(rf"the understanding row: {re.escape(where)}: \d+ tokens do not fit max_seq_len=512; "
                        r"shorten the text or raise max_seq_len", long[0]["reason"])


@pytest.fixture(scope="module")
def edit_shards(tmp_path_factory) -> dict:
    """Four Shapes edits as a manifest, as WebDataset tars (KEY.png, KEY.target.png, KEY.json) and as parquet."""
    import datasets
    import webdataset as wds

    from unigen.shapes.editing import write_edit_dataset

    root = tmp_path_factory.mktemp("edits")
    manifest = write_edit_dataset(root / "manifest", 4, seed=5)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    png = {k: [(manifest.parent / r[k]).read_bytes() for r in rows] for k in ("image", "target")}
    with wds.TarWriter(str(root / "edits.tar")) as tar:
        for i, r in enumerate(rows):
            tar.write({"__key__": f"{i:05d}", "png": png["image"][i], "target.png": png["target"][i],
                       "json": json.dumps({"instruction": r["instruction"]}).encode()})
    features = datasets.Features({"image": datasets.Image(), "target": datasets.Image(),
                                  "instruction": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": x, "path": None} for x in png["image"]],
                                "target": [{"bytes": x, "path": None} for x in png["target"]],
                                "instruction": [r["instruction"] for r in rows]},
                               features=features).to_parquet(str(root / "edits.parquet"))
    return {"manifest": manifest, "wds": root / "edits.tar", "parquet": root / "edits.parquet"}


@pytest.mark.parametrize("kind", ["wds", "parquet"])
def test_streamed_edits_train_the_rows_their_manifest_lines_do(edit_shards, kind, tmp_path):
    from train_common import recipe

    from unigen.data.bad_samples import BadSamples
    from unigen.data.manifest import read_samples
    from unigen.data.stream import ShardStream
    from unigen.training.batches import BatchBuilder
    from unigen.training.mixture import Pick
    from unigen.training.start import build_fresh
    from unigen.training.streamed import StreamBatchBuilder, StreamedPicks

    samples = read_samples(edit_shards["manifest"])
    r = recipe(edit_shards["manifest"], tmp_path)
    model, processor = build_fresh(r, samples)
    streamed = StreamBatchBuilder(model, processor, r.question)
    from_manifest = BatchBuilder(model, processor, r.question)
    for dropout in (0.0, 1.0):  # kept, then every edit dropped to the unconditional row drawn for its position
        picks = StreamedPicks(ShardStream(edit_shards[kind], 4), (0.0, 0.0, 1.0), seed=3, stage=1, grad_accum=1,
                              caption_dropout=dropout, bad=BadSamples()).step_picks(0)[0]
        assert [p.sample.instruction for p in picks] == [s.instruction for s in samples]
        assert all(p.task == "generation" and p.dropped == bool(dropout) and (p.drop is None) == (not dropout)
                   for p in picks)
        got = streamed.build(picks)["generation"]
        want = from_manifest.build([Pick("generation", s, p.dropped, p.drop) for s, p in zip(samples, picks,
                                                                                              strict=True)])
        assert sorted(got) == sorted(want["generation"])
        assert all(torch.equal(got[k], want["generation"][k]) for k in got if isinstance(got[k], torch.Tensor))


def _numbered_tar(path, n, bad) -> None:
    """``n`` text-only records, those at the positions in ``bad`` malformed (no image, no text)."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as tar:
        for i in range(n):
            record = {"conversations": 3} if i in bad else {"text": f"words {i}"}
            tar.write({"__key__": f"{i:05d}", "json": json.dumps(record).encode()})


class _ThreadGather:
    """all_gather_object for streams run in threads, one per rank (the timeout only ends a failing test)."""

    def __init__(self, world: int):
        self.slots, self.barrier = [None] * world, threading.Barrier(world, timeout=120)

    def rank(self, rank: int):
        def gather(value):
            self.slots[rank] = value
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out
        return gather


def _run_ranks(source, batches: int, max_bad: float) -> list:
    """Two processes' streams (global batch 4) run as threads; each rank's outcome (batches read, or the error)."""
    from unigen.data.bad_samples import BadSamples
    from unigen.data.stream import ShardStream

    gather, out = _ThreadGather(2), [None, None]

    def work(rank):
        stream = ShardStream(source, 4, rank=rank, world=2, bad=BadSamples(max_bad), gather=gather.rank(rank))
        try:
            out[rank] = len([b for b, _ in zip(stream, range(batches), strict=False)])
        except DataError as err:
            out[rank] = str(err)

    threads = [threading.Thread(target=work, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_the_bad_share_is_the_runs_summed_over_processes_and_resumes(tmp_path):
    from unigen.data.bad_samples import BadSamples
    from unigen.data.stream import ShardStream
    from unigen.training.streamed import StreamedPicks

    # the first record of every fifth global batch is bad: 5% of the run, but 10% of rank 0's share
    _numbered_tar(tmp_path / "s.tar", 400, {4 * k for k in range(0, 100, 5)})
    assert _run_ranks(tmp_path / "s.tar", 100, 0.06) == [100, 100]  # rank 0 alone would stop at 10% > 6%
    stopped = _run_ranks(tmp_path / "s.tar", 100, 0.04)
    assert stopped[0] == stopped[1]  # both stop at the same batch, with the same line
    assert stopped[0].startswith("10 of 200 streamed samples (5.0%) are bad, more than max_bad_fraction=0.04; "
                                 f"first: {tmp_path / 's.tar'} key 00000: ")
    # resumed after 120 records (6 bad): the check at 200 counts them (the resume state carries both counts)
    picks = StreamedPicks(ShardStream(tmp_path / "s.tar", 4, bad=BadSamples(0.04)), (0.0, 1.0, 0.0), seed=0,
                          stage=1, grad_accum=1, caption_dropout=0.0, bad=BadSamples(0.04))
    for step in range(30):
        picks.step_picks(step)
    picks.gather_bad()
    state = json.loads(json.dumps(picks.state_dict()))
    assert state["stream"]["seen"] == 120 and len(state["bad_samples"]) == 6
    resumed = StreamedPicks(ShardStream(tmp_path / "s.tar", 4, bad=BadSamples(0.04)), (0.0, 1.0, 0.0), seed=0,
                            stage=1, grad_accum=1, caption_dropout=0.0, bad=BadSamples(0.04))
    resumed.load_state_dict(state)
    for step in range(30, 49):
        resumed.step_picks(step)
    with pytest.raises(DataError, match=r"^10 of 200 streamed samples \(5.0%\) are bad"):
        resumed.step_picks(49)


TWO_PROCESSES = """
import sys, torch.distributed as dist
from unigen.data.bad_samples import BadSamples
from unigen.data.stream import ShardStream
from unigen.errors import DataError
from unigen.training.streamed import gather_objects
dist.init_process_group("gloo")
stream = ShardStream(sys.argv[1], 4, rank=dist.get_rank(), world=2, bad=BadSamples(float(sys.argv[2])),
                     gather=gather_objects)
try:
    print(len([b for b, _ in zip(stream, range(100))]))
except DataError as err:
    print(err)
"""


@pytest.mark.slow  # two torchrun launches (over a minute on 2 cores); the threaded case above runs by default
def test_real_processes_sum_the_bad_share(tmp_path):
    import subprocess
    import sys

    from train_common import ENV

    _numbered_tar(tmp_path / "s.tar", 400, {4 * k for k in range(0, 100, 5)})
    (tmp_path / "two.py").write_text(TWO_PROCESSES)
    for max_bad, want in ((0.06, "100"), (0.04, "10 of 200 streamed samples (5.0%) are bad")):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "--tee", "1", str(tmp_path / "two.py"), str(tmp_path / "s.tar"), str(max_bad)],
                              env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [x.split("]:", 1)[1] for x in done.stdout.splitlines() if "]:" in x]
        assert len(lines) == 2 and all(x.startswith(want) for x in lines), done.stdout
