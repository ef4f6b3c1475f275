"""The data layer (unigen.data): one reader for every format, files checked at the door, bad samples skipped
into one list, and pre-extracted codes checked before training."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_common import SMOKE

from unigen.cli import main
from unigen.data.bad_samples import BadSamples, TooManyBadSamplesError
from unigen.data.checks import check_codes, check_sample_files
from unigen.data.codes import BadCodes, read_codes
from unigen.data.images import MAX_ASPECT, MAX_PIXELS, image_problem
from unigen.data.manifest import ManifestError, read_records, read_samples
from unigen.errors import ConfigError, DataError
from unigen.shapes import write_dataset


def _png(path: Path, size, mode="RGB") -> Path:
    Image.new(mode, size).save(path)
    return path


# ---- images at the door ------------------------------------------------------------------------------------

def test_image_problems_are_named_from_the_header_without_decoding(tmp_path):
    assert image_problem(_png(tmp_path / "ok.png", (MAX_ASPECT, 1))) is None  # at the bound: fine
    assert image_problem(_png(tmp_path / "wide.png", (100_000, 1), "1")) == (
        "100000 x 1 pixels: aspect ratio 100,000:1, beyond the bound of 200:1")
    assert "aspect ratio 201:1" in image_problem(_png(tmp_path / "tall.png", (3, 603), "L"))
    big = _png(tmp_path / "big.png", (8001, 8001), "1")  # 64,016,001 pixels in a few kB
    assert image_problem(big) == f"8001 x 8001 pixels, more than the bound of {MAX_PIXELS:,}"
    bomb = _png(tmp_path / "bomb.png", (14_000, 14_000), "1")  # PIL itself refuses this one when opening
    assert image_problem(bomb).startswith(f"more pixels than the bound of {MAX_PIXELS:,}")
    os.mkfifo(tmp_path / "fifo.png")  # opening it would block forever
    assert image_problem(tmp_path / "fifo.png") == "not a regular file (a FIFO)"
    (tmp_path / "link.png").symlink_to(tmp_path / "fifo.png")
    assert image_problem(tmp_path / "link.png") == "not a regular file (a FIFO)"
    assert image_problem(tmp_path) == "not a regular file (a folder)"
    assert image_problem(tmp_path / "none.png") == "missing"
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise)
    (tmp_path / "cut.png").write_bytes(noise.read_bytes()[:1500])  # the header is intact, the pixels are not
    assert image_problem(tmp_path / "cut.png", decode=False) is None
    assert image_problem(tmp_path / "cut.png").startswith("unreadable: ")
    (tmp_path / "text.png").write_text("hello")
    assert image_problem(tmp_path / "text.png").startswith("unreadable: UnidentifiedImageError")


# ---- the bad-sample list and its limit ---------------------------------------------------------------------

def test_bad_share_above_the_limit_stops_in_one_line(tmp_path):
    bad = BadSamples(0.25)
    for i in range(3):
        bad.add(f"m.jsonl:{i + 1}", "missing", file=f"{i}.png", line=i + 1)
    bad.check_share(12)  # 3 of 12 is the limit itself: accepted
    with pytest.raises(TooManyBadSamplesError) as err:
        bad.check_share(11)
    assert str(err.value) == ("3 of 11 samples (27.3%) are bad, more than max_bad_fraction=0.25; first: "
                              "m.jsonl:1: missing; m.jsonl:2: missing; m.jsonl:3: missing. Fix or remove them, "
                              "or raise max_bad_fraction")
    assert "\n" not in str(err.value)
    rows = [json.loads(x) for x in bad.write(tmp_path).read_text().splitlines()]
    assert rows[0] == {"sample": "m.jsonl:1", "line": 1, "file": "0.png", "reason": "missing"}
    for value in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError, match="max_bad_fraction must be a number in \\[0, 1\\]"):
            BadSamples(value)


# ---- codes -------------------------------------------------------------------------------------------------

class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_codes(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Codes files of every bad kind -> (file, what the reason must say)."""
    files = {}

    def add(name, write, reason):
        path = tmp_path / name
        write(path)
        files[name] = (path, reason)

    add("text.npy", lambda p: p.write_text("1 2 3\n"), r"is not a plain \.npy array")
    add("text.pt", lambda p: p.write_text("1 2 3\n"), r"is not a tensor file")
    add("payload.pt", lambda p: torch.save({"codes": Payload(tmp_path / "ran")}, p), r"is not a tensor file")
    add("dict.pt", lambda p: torch.save({"codes": torch.arange(4)}, p), r"holds a dict, not an array")
    add("strings.npy", lambda p: np.save(p, np.array(["1", "2"])), r"holds strings \(<U1\)")
    add("objects.npy", lambda p: np.save(p, np.array([1, "a"], dtype=object)), r"is not a plain \.npy array")
    add("floats.npy", lambda p: np.save(p, np.array([1.0, 2.7])), r"holds floats \(float64\); codes are integers")
    add("floats.pt", lambda p: torch.save(torch.tensor([1.5, 2.0]), p), r"holds torch\.float32 values")
    add("bools.pt", lambda p: torch.save(torch.tensor([True, False]), p), r"holds torch\.bool values")
    add("cube.npy", lambda p: np.save(p, np.zeros((2, 2, 2), np.int64)), r"has shape \(2, 2, 2\)")
    add("empty.npy", lambda p: np.save(p, np.zeros(0, np.int64)), r"has shape \(0,\)")
    add("negative.pt", lambda p: torch.save(torch.tensor([3, -1]), p), r"holds values in \[-1, 3\]")
    add("huge.npy", lambda p: np.save(p, np.array([2**40], np.int64)), r"holds values in \[1099511627776, ")
    add("folder.pt", lambda p: p.mkdir(), r"not a regular file \(a folder\)")
    add("fifo.npy", lambda p: os.mkfifo(p), r"not a regular file \(a FIFO\)")
    return files


def test_every_bad_kind_of_codes_file_is_named_and_none_runs_code(tmp_path):
    for name, (path, reason) in _bad_codes(tmp_path).items():
        with pytest.raises(BadCodes, match=reason) as err:
            read_codes(path, "m.jsonl:1")
        assert str(path) in str(err.value) and "weights_only" not in str(err.value), name
    assert not (tmp_path / "ran").exists(), "a pickled payload ran"
    with pytest.raises(BadCodes, match=r"m.jsonl:4: 'codes' has shape \(0,\)"):
        read_codes([], "m.jsonl:4")


def test_good_codes_in_every_form_read_the_same(tmp_path):
    want = torch.tensor([0, 5, 63, 7], dtype=torch.int32)
    np.save(tmp_path / "a.npy", np.array([[0, 5], [63, 7]], np.uint8))  # an h x w grid of a small dtype
    torch.save(torch.tensor([0, 5, 63, 7]), tmp_path / "b.pt")
    for codes in ([0, 5, 63, 7], tmp_path / "a.npy", tmp_path / "b.pt"):
        got = read_codes(codes, "m.jsonl:1")
        assert got.dtype == torch.int32 and torch.equal(got, want)


def _manifest(tmp_path: Path, data: Path, extra: list[dict]) -> Path:
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    for row in rows:
        row["image"] = str(data.parent / row["image"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=5)


def test_codes_are_checked_at_load_and_against_the_vq(data, tmp_path):
    image = str(data.parent / json.loads(data.read_text().splitlines()[0])["image"])
    np.save(tmp_path / "short.npy", np.arange(3))
    np.save(tmp_path / "high.npy", np.full(4, 9))
    np.save(tmp_path / "good.npy", np.arange(4))
    np.save(tmp_path / "floats.npy", np.zeros(4))
    lines = [{"image": image, "caption": "a", "codes": name} for name in ("short.npy", "high.npy", "good.npy",
                                                                          "floats.npy")]
    manifest = _manifest(tmp_path, data, lines)
    bad = BadSamples(1.0)
    samples, rows = check_sample_files(read_samples(manifest), bad)
    assert len(samples) == 11 and [r["line"] for r in rows] == [12] and "holds floats" in rows[0]["reason"]
    good = check_codes(samples, num_tokens=4, codebook_size=8, bad=bad)
    assert [s.line for s in good if s.codes is not None] == [11]
    assert [(r["line"], r["reason"]) for r in bad.rows[1:]] == [
        (9, f"{manifest}:9: 3 pre-extracted codes; the VQ makes 4"),
        (10, f"{manifest}:10: pre-extracted codes must lie in [0, 8); got [9, 9]")]
    again = BadSamples(0.2)  # one list for both checks: 3 of the 12 lines are bad
    with pytest.raises(TooManyBadSamplesError, match=r"3 of 12 samples \(25\.0%\) .* max_bad_fraction=0\.2"):
        check_codes(check_sample_files(read_samples(manifest), again)[0], 4, 8, again)


# ---- one reader for every format ---------------------------------------------------------------------------

def test_one_reader_for_every_format_and_trainer(tmp_path):
    _png(tmp_path / "a.png", (8, 8))
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "b.png", (8, 8))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a cat"}) + "\n"
                                             + json.dumps({"file_name": "sub/b.png", "prompt": "a dog"}) + "\n")
    assert [s.caption for s in read_samples(tmp_path)] == ["a cat", "a dog"]  # the stage trainer
    assert [r.text for r in read_records(tmp_path, need_text=True)] == ["a cat", "a dog"]  # SigLIP
    assert [r.image for r in read_records(tmp_path)] == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]  # VQ
    edit = tmp_path / "edit.jsonl"
    edit.write_text(json.dumps({"image": "a.png", "instruction": "make it blue", "target": "sub/b.png"}) + "\n")
    assert read_records(edit)[0].image == tmp_path / "a.png" and read_samples(edit)[0].tasks == ["generation"]
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "only words"}) + "\n")
    with pytest.raises(ManifestError, match=r"text.jsonl:1: needs 'image' \(the image trainers read images\)"):
        read_records(tmp_path / "text.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    _png(empty / "c.png", (8, 8))
    with pytest.raises(ManifestError, match="is a folder without metadata.jsonl, but captions are needed"):
        read_samples(empty)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match="latin1.jsonl is not UTF-8 text"):
        read_samples(tmp_path / "latin1.jsonl")


# ---- whole runs --------------------------------------------------------------------------------------------

def test_a_dataset_with_one_percent_odd_samples_trains_to_the_end_with_them_listed(tmp_path, capsys):
    data = write_dataset(tmp_path / "shapes", 300, seed=7)
    odd = tmp_path / "odd"
    odd.mkdir()
    _png(odd / "strip.png", (1, 50_000), "L")
    os.mkfifo(odd / "pipe.png")
    (odd / "torn.png").write_bytes((data.parent / "train" / "000000.png").read_bytes()[:60])
    np.save(odd / "codes.npy", np.full(64, 0.5))
    rows = [{"image": str(odd / name), "caption": "a big red circle"} for name in ("strip.png", "pipe.png",
                                                                                  "torn.png")]
    rows.append({"image": str(data.parent / "train" / "000001.png"), "caption": "a red circle",
                 "codes": str(odd / "codes.npy")})
    manifest = _manifest(tmp_path, data, rows)
    out = tmp_path / "run"
    code = main(["train", "--config", str(SMOKE), "tensorboard=false", "--stage", "1", f"data={manifest}",
                 "--output-dir", str(out), "stage1.steps=2", "stage1.batch_size=2"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (out / "stage1" / "final" / "config.json").is_file()
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    listed = [json.loads(x) for x in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert [r["line"] for r in listed] == [301, 302, 303, 304]
    assert listed[0]["reason"] == "1 x 50000 pixels: aspect ratio 50,000:1, beyond the bound of 200:1"
    assert listed[1]["reason"] == "not a regular file (a FIFO)"
    assert listed[2]["reason"].startswith("unreadable: ")
    assert "holds floats (float64); codes are integers" in listed[3]["reason"]


# ---- streamed shards ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> dict:
    """The same 23 shapes samples (one a corrupt image) as WebDataset tars, parquet files and arrow files."""
    pytest.importorskip("webdataset")
    datasets = pytest.importorskip("datasets")
    import webdataset as wds

    root = tmp_path_factory.mktemp("shards")
    manifest = write_dataset(root / "shapes", 22, seed=9)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    items = [((manifest.parent / r["image"]).read_bytes(), r["caption"]) for r in rows]
    items.insert(13, (items[0][0][:70], "a torn image"))
    sizes = [(0, 7), (7, 15), (15, 23)]  # three shards of unequal size
    (root / "wds").mkdir()
    for n, (a, b) in enumerate(sizes):
        with wds.TarWriter(str(root / "wds" / f"part-{n}.tar")) as tar:
            for i in range(a, b):
                tar.write({"__key__": f"{i:05d}", "png": items[i][0], "txt": items[i][1]})
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": [{"bytes": x, "path": None} for x, _ in items],
                                        "caption": [c for _, c in items]}, features=features)
    (root / "parquet").mkdir()
    for n, (a, b) in enumerate(sizes):
        table.select(range(a, b)).to_parquet(str(root / "parquet" / f"part-{n}.parquet"))
    table.save_to_disk(str(root / "arrow"), num_shards=3)
    return {"wds": root / "wds", "parquet": root / "parquet", "arrow": root / "arrow",
            "captions": sorted(r["caption"] for r in rows)}


def _keys(batch) -> list[tuple[str, bytes]]:
    return [(s.caption, s.image.tobytes()) for s in batch]


@pytest.mark.parametrize("kind", ["wds", "parquet", "arrow"])
def test_two_processes_stream_what_one_does_and_resume_mid_epoch(shard_sets, kind):
    from unigen.data.stream import ShardStream

    steps = 9  # 23 records at 6 a step: the run crosses two epoch ends and resumes mid-shard
    one = ShardStream(shard_sets[kind], 6, seed=3)
    whole = [b for b, _ in zip(one, range(steps), strict=False)]
    # the torn image is skipped (and listed) each time it comes: in epochs 1 and 2, and maybe early in epoch 3
    assert len(one.bad.rows) >= 2 and sum(map(len, whole)) == steps * 6 - len(one.bad.rows)
    assert {r["reason"].split(":")[0] for r in one.bad.rows} == {"unreadable"}
    captions = [s.caption for b in whole for s in b]
    assert sorted(captions[:22]) == sorted(captions[22:44]) == shard_sets["captions"]  # each record once an epoch
    assert one.shard_order(0) != one.shard_order(1) and captions[:22] != captions[22:44]  # reshuffled shards
    ranks = [ShardStream(shard_sets[kind], 6, seed=3, rank=r, world=2) for r in (0, 1)]
    for step, (a, b) in enumerate(zip(*ranks, strict=False)):
        assert _keys(a) + _keys(b) == _keys(whole[step])
        if step == steps - 1:
            break
    first = ShardStream(shard_sets[kind], 6, seed=3)
    stream = iter(first)
    for _ in range(4):
        next(stream)
    state = json.loads(json.dumps(first.state_dict()))  # plain values: a checkpoint's JSON holds it
    assert state["epoch"] == 1 and state["offset"] > 0  # mid-epoch, mid-shard
    resumed = ShardStream(shard_sets[kind], 6, seed=3)
    resumed.load_state_dict(state)
    rest = [b for b, _ in zip(resumed, range(steps - 4), strict=False)]
    assert [_keys(b) for b in rest] == [_keys(b) for b in whole[4:]]
    with pytest.raises(DataError, match="resume with the same data, seed and global batch size"):
        ShardStream(shard_sets[kind], 4, seed=3).load_state_dict(state)


def test_streamed_samples_share_the_manifest_formats_and_errors(tmp_path):
    pytest.importorskip("webdataset")
    import webdataset as wds

    from unigen.data.shards import list_shards
    from unigen.data.stream import ShardStream

    png = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (200, 0, 0)).save(png)
    conv = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}
    with wds.TarWriter(str(tmp_path / "s.tar")) as tar:
        tar.write({"__key__": "a", "png": png.read_bytes(), "json": json.dumps(conv).encode()})
        tar.write({"__key__": "b", "json": json.dumps({"text": "only words"}).encode()})
        tar.write({"__key__": "c", "png": _png(tmp_path / "w.png", (1000, 2), "L").read_bytes(), "txt": b"x"})
        tar.write({"__key__": "d", "png": png.read_bytes(), "json": json.dumps({"conversations": 3}).encode()})
    batch = next(iter(stream := ShardStream(tmp_path / "s.tar", 4)))
    assert [s.tasks for s in batch] == [["understanding"], ["text"]] and batch[0].turns == [("What?", "red")]
    assert [r["reason"] for r in stream.bad.rows] == [
        "1000 x 2 pixels: aspect ratio 500:1, beyond the bound of 200:1",
        f"{tmp_path / 's.tar'} key d: 'conversations' must alternate human and gpt turns, starting with human, "
        'each {"from": ..., "value": "..."}; got int turn(s)']
    assert [r["sample"] for r in stream.bad.rows] == [f"{tmp_path / 's.tar'} key {k}" for k in "cd"]
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.tar").write_bytes(b"")
    (tmp_path / "mixed" / "b.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"mixes shard kinds \['.parquet', '.tar'\]"):
        list_shards(tmp_path / "mixed")
    with pytest.raises(FileNotFoundError, match="streamed data .*none does not exist"):
        list_shards(tmp_path / "none")
    with pytest.raises(ValueError, match="a global batch of 5 cannot be split evenly over 2 process"):
        ShardStream(tmp_path / "s.tar", 5, world=2)
