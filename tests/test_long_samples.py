"""A sample too long for the context is found at start-up, listed in bad_samples.jsonl and skipped: the run (and
its resume) trains to the end instead of stopping at the step that draws it."""

import json
import re

import pytest
from train_common import losses, recipe

from unigen.data.bad_samples import BadSamples
from unigen.data.manifest import read_samples
from unigen.shapes import write_dataset
from unigen.training import run_stage
from unigen.training.batches import BatchBuilder, TooLongError
from unigen.training.mixture import Pick
from unigen.training.start import load_start


def test_a_caption_longer_than_the_context_is_listed_and_the_run_goes_on(tmp_path):
    data = write_dataset(tmp_path / "shapes", 3, seed=5)
    root = data.parent
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    for row in rows:
        row["image"] = str(root / row["image"])
    long_caption = " ".join(["a small red circle at the top"] * 150)  # ~1000 words; the context is 512
    rows.insert(1, {"image": rows[0]["image"], "caption": long_caption})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(map(json.dumps, rows)) + "\n")
    # one of four samples is bad: above the default share that stops a run (a share this test does not test)
    r = recipe(manifest, tmp_path / "run", "save_every=5", "max_bad_fraction=0.5")

    # without the start-up check, the step that draws it would stop the run
    samples = read_samples(manifest)
    model, processor = load_start(r, 1, samples, None)
    b = BatchBuilder(model, processor, r.question, r.max_seq_len)
    with pytest.raises(TooLongError, match=r"manifest line 2: the generation prompt \(\d+ tokens\) and 64 image "
                                           r"tokens do not fit max_seq_len=512; shorten the text or raise"):
        b.generation_prompt(Pick("generation", samples[1]))
    bad = BadSamples()
    pools = b.skip_unfit({"understanding": samples, "generation": samples}, bad)
    assert [s.line for s in pools["understanding"]] == [s.line for s in pools["generation"]] == [1, 3, 4]

    run_stage(r, 1, max_steps=5, progress=False)  # stopped after step 5, as by a kill after its checkpoint
    listed = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert listed == bad.rows and len(listed) == 1 and listed[0]["line"] == 2
    assert re.fullmatch(r"the understanding row: manifest line 2: \d+ tokens do not fit max_seq_len=512; shorten "
                        r"the text or raise max_seq_len", listed[0]["reason"])
    run_stage(r, 1, resume="latest", progress=False)
    assert [step for step, _ in losses(tmp_path / "run")] == list(range(1, 11))
    assert (tmp_path / "run" / "stage1" / "final").is_dir()
    assert [json.loads(x) for x in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()] == listed
