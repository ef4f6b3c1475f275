"""The tokenizer trainers under a launcher: 2 processes (CPU, gloo) train what 1 process trains at the same global
batch, only rank 0 writes the tokenizer, every process saves its RNG, and a resumed 2-process run is bitwise the
uninterrupted one."""

import json
import shutil
import sys

import pytest
import torch
from test_tokenizer_trainers import write_images
from test_train_resume import free_port
from train_common import run

from unigen.training.tokenizer.run_checks import read_weights
from unigen.training.tokenizer.siglip_trainer import load_siglip_dual, tokenize
from unigen.training.tokenizer.vq_trainer import load_vq

TINY_VQ = ["vq.image_size=16", "vq.base_channels=32", "vq.channel_mult=[1,2]", "vq.num_res_blocks=1",
           "vq.z_channels=32", "vq.embed_dim=4", "vq.codebook_size=32"]
# the warm-up's k-means, a dead-code re-seeding window and random flips: every part that draws or counts
VQ = ["steps=4", "lr=3e-3", "warmup_steps=1", "val_size=0", "log_every=1", "eval_every=1000", "sample_images=0",
      "ae_warmup_steps=1", "kmeans_batches=1", "usage_window=2", "random_flip=true", "weight_decay=0.1",
      "reinit_stop_fraction=1.0", "device=cpu", "tensorboard=false", *TINY_VQ]
SIGLIP = ["steps=4", "lr=3e-3", "warmup_steps=1", "val_size=0", "log_every=1", "eval_every=1000", "device=cpu",
          "embed_dim=32", "vision.image_size=16", "vision.patch_size=8", "vision.width=32", "vision.depth=1",
          "vision.num_heads=2", "text.width=32", "text.depth=1", "text.num_heads=2", "text.max_len=8",
          "tensorboard=false"]


def one(command, *args):
    return run([sys.executable, "-m", "unigen.cli", command, *map(str, args)], timeout=900)


def two(command, *args):
    # --multi_gpu: accelerate's torchrun launcher, also without GPUs (--cpu alone would start one process)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port()), "-m", "unigen.cli"]
    return run([*launcher, command, *map(str, args)], timeout=900)


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def without_key_biases(weights: dict, width: int | None = None) -> dict:
    """The weights less the attention key biases: a key bias adds the same number to every logit of a query, which
    softmax removes, so its gradient is zero but for float noise, and AdamW turns noise into lr-sized steps that
    differ between any two runs. What they do (nothing) is checked on the outputs instead. The VQ's are ``*.k.bias``,
    the SigLIP's the middle third of ``qkv.bias`` and the first half of the pool's ``kv.bias`` (``width`` each)."""
    out = {name: w for name, w in weights.items() if not name.endswith(".k.bias")}
    if width is None:
        return out
    keys = {name: slice(width, 2 * width) for name in out if name.endswith("qkv.bias")}
    keys["image_head.kv.bias"] = slice(0, width)
    for name, part in keys.items():
        out[name] = torch.cat([weights[name][:part.start], weights[name][part.stop:]])
    return out


def assert_same(a, b, tol=1e-5, width=None):
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4]
    assert all(abs(x - y) < tol for (_, x), (_, y) in zip(la, lb, strict=True)), (la, lb)
    wa, wb = read_weights(a / "model.safetensors"), read_weights(b / "model.safetensors")
    wa, wb = without_key_biases(wa, width), without_key_biases(wb, width)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < tol


def assert_same_vq(a, b):
    """Two VQ runs compute the same tokenizer: per-step losses and the codebook to 1e-5, and reconstructions and
    encoder outputs of 64 random images to 1e-4. Their weights are not compared one by one: the group-mean part of a
    conv bias in front of a GroupNorm changes nothing the VQ computes, so its gradient is float noise, which AdamW
    turns into steps near lr that differ between a 1- and a 2-process run (their all-reduce rounds differently)."""
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4]
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(la, lb, strict=True)), (la, lb)
    va, vb = load_vq(a), load_vq(b)
    assert (va.quantize.embedding.weight - vb.quantize.embedding.weight).abs().max() < 1e-5
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert (va.quant_conv(va.encoder(x)) - vb.quant_conv(vb.encoder(x))).abs().max() < 1e-4
        assert (va(x)[0] - vb(x)[0]).abs().max() < 1e-4


@pytest.mark.slow  # three launches of the VQ trainer, two of them 2-process (~1 min)
def test_two_process_vq_equals_one_process_and_resumes_bitwise(tmp_path):
    data = write_images(tmp_path, 16)
    one("train-vq", f"data={data}", "batch_size=8", "--output-dir", tmp_path / "one", *VQ)
    two("train-vq", f"data={data}", "batch_size=4", "--output-dir", tmp_path / "two", "save_every=2", "keep_last=5",
        *VQ)
    assert_same_vq(tmp_path / "one", tmp_path / "two")
    step2 = tmp_path / "two" / "checkpoints" / "step_0000002"
    assert {"rng_0.pt", "rng_1.pt", "model.safetensors", "optimizer.pt"} <= {p.name for p in step2.iterdir()}
    assert json.loads((step2 / "progress.json").read_text())["data"]["global_batch"] == 8
    # a run stopped at step 2 continues from its checkpoint to the uninterrupted run's weights, bit for bit
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / step2.name)
    two("train-vq", f"data={data}", "batch_size=4", "--output-dir", tmp_path / "resumed", "--resume", "latest",
        "save_every=2", *VQ)
    wa = read_weights(tmp_path / "two" / "model.safetensors")
    wb = read_weights(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(tmp_path / "resumed")[-2:] == losses(tmp_path / "two")[-2:]


@pytest.mark.slow  # two launches of the SigLIP trainer, one 2-process (~40 s)
def test_two_process_siglip_equals_one_process_over_all_pairs_of_the_global_batch(tmp_path):
    data = write_images(tmp_path, 24)  # 16 distinct captions: same-text pairs across processes count as matching
    one("train-siglip", f"data={data}", "batch_size=8", "--output-dir", tmp_path / "one", *SIGLIP)
    two("train-siglip", f"data={data}", "batch_size=4", "--output-dir", tmp_path / "two", "save_every=4", *SIGLIP)
    assert_same(tmp_path / "one", tmp_path / "two", width=32)
    (one_model, tok), (two_model, _) = load_siglip_dual(tmp_path / "one"), load_siglip_dual(tmp_path / "two")
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    ids, mask = tokenize(tok, ["a red square at the left", "a blue square at the top"], 8)
    with torch.no_grad():
        assert (one_model.encode_image(x) - two_model.encode_image(x)).abs().max() < 1e-5
        assert (one_model.encode_text(ids, mask) - two_model.encode_text(ids, mask)).abs().max() < 1e-5
    step4 = tmp_path / "two" / "checkpoints" / "step_0000004"
    assert {"rng_0.pt", "rng_1.pt", "tokenizer.json"} <= {p.name for p in step4.iterdir()}  # two processes ran
    assert (tmp_path / "two" / "tokenizer.json").read_text() == (tmp_path / "one" / "tokenizer.json").read_text()
