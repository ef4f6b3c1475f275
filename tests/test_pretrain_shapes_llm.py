"""benchmarks/pretrain_shapes_llm.py: the text LLM of a Shapes run from parts (issue 36), at a smoke size."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unigen.data.manifest import read_samples
from unigen.shapes import write_dataset
from unigen.training.recipe import load_recipe
from unigen.training.start import build_fresh

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "pretrain_shapes_llm.py"
RECIPE = REPO / "train" / "shapes-from-parts.yaml"
SMOKE = ["model.preset=smoke"]


def pretrain(monkeypatch, data: Path, out: Path) -> dict:
    main = runpy.run_path(str(SCRIPT))["main"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--data", str(data), "--out", str(out), "--config", str(RECIPE),
                                      "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--documents", "200",
                                      *SMOKE])
    main()
    return json.loads((out / "pretrain.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=3)


def test_same_seed_same_weights_and_it_learns(data, tmp_path, monkeypatch):
    first = pretrain(monkeypatch, data, tmp_path / "a")
    pretrain(monkeypatch, data, tmp_path / "b")
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    nats = first["held_out_nats_per_caption"]
    assert nats["after"] < nats["before"]
    assert first["last_loss"] < first["first_loss"]


def test_llm_from_reads_the_ids_and_logits_of_a_from_scratch_run(data, tmp_path, monkeypatch):
    """A run from this LLM and a run from scratch tokenize alike, and the decoder is the saved model exactly."""
    from transformers import LlamaForCausalLM

    out = tmp_path / "llm"
    pretrain(monkeypatch, data, out)
    samples = read_samples(data)
    common = [f"data={data}", *SMOKE]
    parts, parts_proc = build_fresh(load_recipe(RECIPE, [*common, f"output_dir={tmp_path / 'p'}", f"llm_from={out}"]),
                                    samples)
    scratch, scratch_proc = build_fresh(load_recipe(RECIPE, [*common, f"output_dir={tmp_path / 's'}"]), samples)
    assert parts_proc.tokenizer.get_vocab() == scratch_proc.tokenizer.get_vocab()
    assert parts.config.tokens == scratch.config.tokens
    assert parts.config.prompt_format == scratch.config.prompt_format == "janus-pro"
    assert parts.config.llm.vocab_size == scratch.config.llm.vocab_size
    reference = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    batch = parts_proc.tokenizer(["a small red circle at the top left"], return_tensors="pt")
    with torch.no_grad():
        ours = parts.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = reference(input_ids=batch["input_ids"]).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
