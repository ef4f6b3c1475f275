"""Bad inputs and faults through the CLI: each ends in one ``error: ...`` line naming the problem, the right exit
code (1, or 2 for a usage error), no traceback, nothing written or replaced, and no code run from a file.

Every case runs ``unigen.cli.main`` in this process on tiny checkpoints and runs; the files under the case's
folder and the shared fixtures are hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_common import SMOKE

from unigen.cli import main
from unigen.shapes import write_dataset

TRAIN = ["train", "--config", str(SMOKE), "tensorboard=false"]


class Payload:
    """Pickled, it calls ``open(marker, "w")`` when unpickled: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path, value=None) -> None:
    torch.save({"state": value if value is not None else {}, "payload": Payload(marker)}, path)


def tree_hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- shared fixtures (built once) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tiny_hf_janus, tmp_path_factory) -> Path:
    """A tiny checkpoint in unigen's own layout."""
    from unigen.generation.pipeline import UniGenPipeline

    directory = tmp_path_factory.mktemp("unigen_ckpt")
    UniGenPipeline.from_pretrained(tiny_hf_janus[1]).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=3)


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    """Stage 1 of the smoke recipe, finished, with a resumable checkpoint at step 1."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main([*TRAIN, "--stage", "1", f"data={data}", "--output-dir", str(out), "stage1.steps=2",
                 "stage1.batch_size=2", "--save-every", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def vq_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vq") / "vq"
    assert main(["train-vq", f"data={data}", f"out_dir={out}", "steps=1", "batch_size=2", "val_size=0",
                 "sample_images=0", "device=cpu", "vq={image_size: 16, base_channels: 16, channel_mult: [1, 2], "
                 "num_res_blocks: 1, z_channels: 16, embed_dim: 4, codebook_size: 16, norm_groups: 8}"]) == 0
    return out


@dataclass
class Env:
    tmp: Path
    model: Path
    data: Path
    request: pytest.FixtureRequest
    marker: Path

    def copy_model(self) -> Path:
        target = self.tmp / "ckpt"
        shutil.copytree(self.model, target)
        return target

    def copy_run(self) -> Path:
        target = self.tmp / "run"
        shutil.copytree(self.request.getfixturevalue("finished_run"), target)
        return target

    def copy_vq(self) -> Path:
        target = self.tmp / "vq"
        shutil.copytree(self.request.getfixturevalue("vq_run"), target)
        return target

    def image(self, name: str = "good.png", size=(8, 8)) -> Path:
        path = self.tmp / name
        Image.new("RGB", size, (10, 200, 10)).save(path)
        return path


# ---- the table -------------------------------------------------------------------------------------------
# (id, argv builder, exit code, regex the last error line must match, error lines expected)

def _edit_config(env: Env, **changes) -> Path:
    ckpt = env.copy_model()
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **changes}))
    return ckpt


def _truncated_weights(env: Env) -> Path:
    ckpt = env.copy_model()
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ckpt


def _pickled_weights(env: Env) -> Path:
    ckpt = env.copy_model()
    (ckpt / "model.safetensors").unlink()
    plant_pickle(ckpt / "pytorch_model.bin", env.marker)
    return ckpt


def _shard_outside(env: Env) -> Path:
    ckpt = env.copy_model()
    (ckpt / "model.safetensors").rename(env.tmp / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"gen_embed.weight": "../outside.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return ckpt


def _nan_weights(env: Env) -> Path:
    from safetensors.torch import load_file, save_file

    ckpt = env.copy_model()
    state = load_file(ckpt / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
              ckpt / "model.safetensors")
    return ckpt


def _self_link(env: Env) -> Path:
    ckpt = env.copy_model()
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to("config.json")
    return ckpt


def _bad_tokenizer(env: Env) -> Path:
    ckpt = env.copy_model()
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"')
    return ckpt


def _earlier_images(env: Env) -> Path:
    out = env.tmp / "out"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "image_000.png")
    return out


def _run_checkpoint(env: Env, name: str) -> Path:
    ckpt = env.copy_run() / "stage1" / "checkpoints" / "step_0000001"
    plant_pickle(ckpt / name, env.marker, torch.load(ckpt / name, weights_only=True))
    return ckpt


def _vq_state(env: Env) -> Path:
    vq = env.copy_vq()
    ckpt = vq / "checkpoints" / "step_0000001"
    plant_pickle(ckpt / "optimizer.pt", env.marker)
    return ckpt


def _manifest_with(env: Env, extra: list[dict]) -> Path:
    """The shared data's lines (absolute image paths) and ``extra`` lines, in ``env.tmp/m.jsonl``."""
    rows = [json.loads(x) for x in env.data.read_text().splitlines()]
    for row in rows:
        row["image"] = str(env.data.parent / row["image"])
    manifest = env.tmp / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return manifest


def _odd_images(env: Env) -> Path:
    """Two of ten samples bad (a FIFO, a 2 x 900 image): above the default max_bad_fraction of 0.05."""
    os.mkfifo(env.tmp / "pipe.png")
    return _manifest_with(env, [{"image": str(env.tmp / "pipe.png"), "caption": "a red circle"},
                                {"image": str(env.image("thin.png", (2, 900))), "caption": "a red circle"}])


def _codes_file(env: Env, name: str, write) -> Path:
    """One line of nine with a bad ``codes`` file (written by ``write(path)``)."""
    write(env.tmp / name)
    image = env.data.parent / json.loads(env.data.read_text().splitlines()[0])["image"]
    return _manifest_with(env, [{"image": str(image), "caption": "a red circle", "codes": str(env.tmp / name)}])


def train_on(env: Env, manifest: Path, *flags):
    return [*TRAIN, "--stage", "1", f"data={manifest}", "--output-dir", env.tmp / "r", *flags]


def _bad_codes_case(name: str, write, reason: str):
    return (f"train-codes-{name}", lambda e: train_on(e, _codes_file(e, name, write)), 1,
            r"1 of 9 samples \(11\.1%\) are bad, more than max_bad_fraction=0\.05; first: .*m\.jsonl:9: codes file "
            + reason, 1)

def _adapter(env: Env, damage: str) -> Path:
    """A LoRA adapter over the shared checkpoint with its weights ``truncated``, or a ``pickled`` .bin instead."""
    from unigen import UniGenModel
    from unigen.training.lora import LoraSettings, attach, save_adapter

    folder = env.tmp / "adapter"
    save_adapter(attach(UniGenModel.from_pretrained(env.model), LoraSettings(r=2), "lora"), folder, str(env.model))
    weights = folder / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
        plant_pickle(folder / "adapter_model.bin", env.marker)
    return folder


def gen(env: Env, *flags, model=None, prompt="a red circle"):
    model = model if model is not None else env.model
    return ["generate", prompt, "--model", model, "--device", "cpu", "--output-dir", env.tmp / "out", *flags]


def cap(env: Env, *images, model=None, flags=()):
    model = model if model is not None else env.model
    return ["caption", *images, "--model", model, "--device", "cpu", "--max-new-tokens", "2", *flags]


def ev(env: Env, *flags, model=None):
    model = model if model is not None else env.tmp / "no-model"  # a check that came after the load would fail
    return ["eval", "shapes", "--model", model, "--device", "cpu", "--n", "1", *flags]


def train(env: Env, *flags):
    return [*TRAIN, "--stage", "1", f"data={env.data}", *flags]


VQ_SMALL = ["val_size=0", "device=cpu", "sample_images=0", "batch_size=2"]

CASES = [
    # load: every path into a checkpoint
    ("load-missing-dir", lambda e: gen(e, model=e.tmp / "nowhere"), 1, r"does not exist", 1),
    ("load-path-is-a-file", lambda e: gen(e, model=e.image()), 1, r"is a file; pass the checkpoint directory", 1),
    ("load-empty-dir", lambda e: gen(e, model=(e.tmp / "empty").mkdir() or e.tmp / "empty"), 1, r"no config\.json", 1),
    ("load-config-is-a-list", lambda e: gen(e, model=(lambda c: c.joinpath("config.json").write_text("[1, 2]") and c)(
        e.copy_model())), 1, r"config\.json holds a JSON list, not an object", 1),
    ("load-config-not-json", lambda e: gen(e, model=(lambda c: c.joinpath("config.json").write_text("{oops") and c)(
        e.copy_model())), 1, r"config\.json is not valid JSON", 1),
    ("load-config-links-to-itself", lambda e: gen(e, model=_self_link(e)), 1, r"symbolic link that leads nowhere", 1),
    ("load-config-unknown-key", lambda e: gen(e, model=_edit_config(e, colour="red")), 1,
     r"unknown key\(s\) in config: \['colour'\]", 1),
    ("load-config-unknown-fusion", lambda e: gen(e, model=_edit_config(e, fusion="xattn")), 1,
     r"config\.fusion must be one of \['concat', 'cross_attention'\], got 'xattn'", 1),
    ("load-config-nan-guidance", lambda e: gen(e, model=_edit_config(e, guidance_scale=float("nan"))), 1,
     r"config\.guidance_scale must be a finite number", 1),
    ("load-config-inf-temperature", lambda e: gen(e, model=_edit_config(e, temperature=float("inf"))), 1,
     r"config\.temperature must be a finite number", 1),
    ("load-truncated-safetensors", lambda e: gen(e, model=_truncated_weights(e)), 1,
     r"model\.safetensors could not be read as safetensors.*truncated", 1),
    ("load-pickle-that-runs-code", lambda e: gen(e, model=_pickled_weights(e)), 1,
     r"pytorch_model\.bin could not be read as a weights-only", 1),
    ("load-shard-outside-folder", lambda e: gen(e, model=_shard_outside(e)), 1, r"outside the checkpoint folder", 1),
    ("load-damaged-tokenizer", lambda e: gen(e, model=_bad_tokenizer(e)), 1, r"tokenizer\.json is damaged", 1),
    ("load-nan-weights", lambda e: gen(e, model=_nan_weights(e)), 1, r"hold NaN or infinite values", 1),
    # generate
    ("generate-guidance-nan", lambda e: gen(e, "--guidance-scale", "nan"), 2, r"--guidance-scale: expected a fin", 1),
    ("generate-guidance-inf", lambda e: gen(e, "--guidance-scale", "inf"), 2, r"--guidance-scale: expected a fin", 1),
    ("generate-guidance-negative", lambda e: gen(e, "--guidance-scale", "-1"), 2, r"guidance_scale must be >= 0", 1),
    ("generate-temperature-nan", lambda e: gen(e, "--temperature", "nan"), 2, r"--temperature: expected a finite", 1),
    ("generate-temperature-negative", lambda e: gen(e, "--temperature", "-1"), 2, r"temperature must be >= 0", 1),
    ("generate-top-p-2", lambda e: gen(e, "--top-p", "2"), 2, r"top_p must be in \(0, 1\]", 1),
    ("generate-top-k-negative", lambda e: gen(e, "--top-k", "-3"), 2, r"top_k must be >= 0", 1),
    ("generate-zero-images", lambda e: gen(e, "--num-images", "0"), 2, r"--num-images: must be at least 1", 1),
    ("generate-seed-over-64-bits", lambda e: gen(e, "--seed", str(2**64)), 2, r"--seed: a seed must be in", 1),
    ("generate-bad-cfg-schedule", lambda e: gen(e, "--cfg-schedule", "cosine"), 2, r"unknown cfg_schedule", 1),
    ("generate-prompt-not-utf8", lambda e: gen(e, prompt="a red \udcff circle"), 2, r"prompt is not valid UTF-8", 1),
    ("generate-output-dir-is-a-file", lambda e: ["generate", "x", "--model", e.model, "--output-dir", e.image()], 2,
     r"--output-dir .* is a file, not a folder", 1),
    ("generate-output-dir-under-a-file", lambda e: ["generate", "x", "--model", e.model, "--output-dir",
                                                     e.image() / "sub"], 2, r"is a file, so the folder cannot", 1),
    ("generate-earlier-images", lambda e: ["generate", "x", "--model", e.model, "--output-dir", _earlier_images(e)],
     1, r"already holds images of an earlier run \(image_000\.png\); pass --overwrite", 1),
    # caption: one unreadable input is named and the rest are captioned
    ("caption-directory-among-good", lambda e: cap(e, e.image(), (e.tmp / "folder").mkdir() or e.tmp / "folder"), 1,
     r"1 image\(s\) could not be read: .*folder", 2),
    ("caption-missing-and-corrupt", lambda e: cap(e, e.tmp / "missing.png", (e.tmp / "bad.png").write_bytes(b"no")
                                                  and e.tmp / "bad.png", e.image()), 1,
     r"2 image\(s\) could not be read", 3),
    ("caption-temperature-nan", lambda e: cap(e, e.image(), flags=("--temperature", "nan")), 2,
     r"--temperature: expected a finite number", 1),
    ("caption-zero-tokens", lambda e: cap(e, e.image(), flags=("--max-new-tokens", "0")), 2,
     r"--max-new-tokens: must be at least 1", 1),
    ("caption-question-not-utf8", lambda e: cap(e, e.image(), flags=("--question", "what \udcff?")), 2,
     r"question is not valid UTF-8", 1),
    # control tokens in user text: refused before the model loads (the model path does not exist)
    ("generate-prompt-with-begin-of-image", lambda e: gen(e, model=e.tmp / "none", prompt="a <begin_of_image> dog"),
     2, r"prompt must not contain <begin_of_image>: it is a control token", 1),
    ("generate-negative-prompt-with-eos", lambda e: gen(e, "--negative-prompt", "x<｜end▁of▁sentence｜>",
                                                        model=e.tmp / "none"), 2,
     r"negative prompt must not contain <｜end▁of▁sentence｜>", 1),
    ("caption-question-with-placeholder", lambda e: cap(e, e.image(), model=e.tmp / "none",
                                                        flags=("--question", "<image_placeholder> what?")), 2,
     r"question must not contain <image_placeholder>", 1),
    ("edit-instruction-with-end-of-image", lambda e: ["edit", e.image(), "make it <end_of_image> blue", "--model",
                                                      e.tmp / "none", "--output-dir", e.tmp / "o"], 2,
     r"instruction must not contain <end_of_image>", 1),
    # eval: flags and destinations before any loading (the model path does not exist)
    ("eval-json-is-a-directory", lambda e: ev(e, "--json", e.tmp), 2, r"--json .* is a folder; pass a file name", 1),
    ("eval-guidance-negative", lambda e: ev(e, "--guidance-scale", "-1"), 2, r"guidance_scale must be >= 0", 1),
    ("eval-temperature-inf", lambda e: ev(e, "--temperature", "inf"), 2, r"expected a finite number", 1),
    ("eval-batch-size-zero", lambda e: ev(e, "--batch-size", "0"), 2, r"--batch-size: must be at least 1", 1),
    ("eval-n-zero", lambda e: ev(e, "--n", "0"), 2, r"--n: must be at least 1", 1),
    # train
    ("train-into-finished-run", lambda e: train(e, "--output-dir", e.copy_run()), 1,
     r"holds the weights of an earlier run of stage 1: pass --resume latest .* overwrite=true", 1),
    ("train-resume-pickled-optimizer", lambda e: train(e, "--output-dir", e.tmp / "run", "--resume",
                                                       _run_checkpoint(e, "optimizer.pt")), 1,
     r"optimizer\.pt holds more than tensors", 1),
    ("train-resume-pickled-rng", lambda e: train(e, "--output-dir", e.tmp / "run", "--resume",
                                                 _run_checkpoint(e, "rng_0.pt")), 1, r"rng_0\.pt holds more than", 1),
    ("train-resume-not-a-checkpoint", lambda e: train(e, "--output-dir", e.tmp / "r", "--resume", e.tmp), 1,
     r"is not a training checkpoint \(no progress\.json\)", 1),
    ("train-zero-steps", lambda e: train(e, "--output-dir", e.tmp / "r", "stage1.steps=0"), 1,
     r"stage1\.steps must be >= 1", 1),
    ("train-data-without-value", lambda e: [*TRAIN, "--output-dir", e.tmp / "r", "data="], 1,
     r"config\.data needs a value|\.data needs a value", 1),
    ("train-lr-nan", lambda e: train(e, "--output-dir", e.tmp / "r", "stage1.lr=nan"), 1,
     r"stage1\.lr must be a finite number", 1),
    ("train-config-missing", lambda e: ["train", "--config", e.tmp / "none.yaml", f"data={e.data}"], 1,
     r"none\.yaml does not exist", 1),
    ("train-config-is-a-list", lambda e: ["train", "--config", (e.tmp / "l.yaml").write_text("- 1\n") and
                                          e.tmp / "l.yaml"], 1, r"must hold a YAML mapping", 1),
    ("train-unknown-key", lambda e: train(e, "--output-dir", e.tmp / "r", "stage1.stepz=3"), 1,
     r"unknown key\(s\) in .*\['stepz'\]", 1),
    ("train-max-steps-zero", lambda e: train(e, "--output-dir", e.tmp / "r", "--max-steps", "0"), 2,
     r"--max-steps: must be at least 1", 1),
    ("train-data-missing", lambda e: [*TRAIN, "--output-dir", e.tmp / "r", f"data={e.tmp / 'none.jsonl'}"], 1,
     r"training data .*none\.jsonl does not exist", 1),
    # bad samples: skipped and listed, but a share above max_bad_fraction stops the run before it writes
    ("train-too-many-bad-images", lambda e: train_on(e, _odd_images(e)), 1,
     r"2 of 10 samples \(20\.0%\) are bad, more than max_bad_fraction=0\.05; first: .*m\.jsonl:9: not a regular "
     r"file \(a FIFO\); .*m\.jsonl:10: 2 x 900 pixels: aspect ratio 450:1, beyond the bound of 200:1\. Fix", 1),
    ("train-max-bad-fraction-above-one", lambda e: train(e, "--output-dir", e.tmp / "r", "max_bad_fraction=1.5"),
     1, r"max_bad_fraction must be in \[0, 1\], got 1\.5", 1),
    _bad_codes_case("text.npy", lambda p: p.write_text("[1, 2, 3]"), r".*text\.npy is not a plain \.npy array"),
    _bad_codes_case("pickle.pt", lambda p: plant_pickle(p, p.parent.parent / f"{p.parent.name}-payload-ran"),
                    r".*pickle\.pt is not a tensor file: it holds more than tensors"),
    _bad_codes_case("dict.pt", lambda p: torch.save({"codes": list(range(64))}, p),
                    r".*dict\.pt holds a dict, not an array of integer codes"),
    _bad_codes_case("words.npy", lambda p: np.save(p, np.array(["red", "circle"])),
                    r".*words\.npy holds strings \(<U6\); codes are integers"),
    _bad_codes_case("halves.npy", lambda p: np.save(p, np.arange(64) + 0.5),
                    r".*halves\.npy holds floats \(float64\); codes are integers \(floats are never truncated\)"),
    _bad_codes_case("halves.pt", lambda p: torch.save(torch.arange(64, dtype=torch.float16), p),
                    r".*halves\.pt holds torch\.float16 values; codes are integers"),
    _bad_codes_case("grid3d.npy", lambda p: np.save(p, np.zeros((4, 4, 4), np.int32)),
                    r".*grid3d\.npy has shape \(4, 4, 4\); codes are a 1-D array"),
    _bad_codes_case("below0.pt", lambda p: torch.save(torch.arange(64) - 2, p),
                    r".*below0\.pt holds values in \[-2, 61\]; codes are >= 0"),
    # tokenizer trainers
    ("train-vq-negative-steps", lambda e: ["train-vq", f"data={e.data}", "steps=-3", *VQ_SMALL], 1,
     r"steps must be >= 1, got -3", 1),
    ("train-vq-lr-nan", lambda e: ["train-vq", f"data={e.data}", "lr=.nan", *VQ_SMALL], 1,
     r"lr must be a finite number", 1),
    ("train-vq-data-without-value", lambda e: ["train-vq", "data=", *VQ_SMALL], 1, r"data needs a value", 1),
    ("train-vq-data-missing", lambda e: ["train-vq", f"data={e.tmp / 'none'}", f"out_dir={e.tmp / 'o'}", *VQ_SMALL],
     1, r"training data .*none does not exist \(a JSONL manifest, .*or a folder of images\)", 1),
    ("train-vq-too-many-bad-images", lambda e: ["train-vq", f"data={_odd_images(e)}", f"out_dir={e.tmp / 'o'}",
                                                *VQ_SMALL], 1,
     r"2 of 10 training images \(20\.0%\) are bad, more than max_bad_fraction=0\.05; first: .*pipe\.png: not a "
     r"regular file \(a FIFO\)", 1),
    ("train-siglip-too-many-bad-images", lambda e: ["train-siglip", f"data={_odd_images(e)}", f"out_dir={e.tmp / 's'}",
                                                    "val_size=0", "device=cpu", "max_bad_fraction=0.1"], 1,
     r"2 of 10 training images \(20\.0%\) are bad, more than max_bad_fraction=0\.1", 1),
    ("train-vq-resume-pickled-state", lambda e: ["train-vq", f"data={e.data}", f"out_dir={e.tmp / 'vq'}",
                                                  f"resume={_vq_state(e)}", *VQ_SMALL], 1,
     r"optimizer\.pt holds more than tensors", 1),
    ("train-siglip-negative-steps", lambda e: ["train-siglip", f"data={e.data}", "steps=-1"], 1,
     r"steps must be >= 1, got -1", 1),
    ("train-siglip-zero-batch", lambda e: ["train-siglip", f"data={e.data}", "batch_size=0"], 1,
     r"batch_size must be >= 1, got 0", 1),
    ("train-siglip-resume-not-a-checkpoint", lambda e: ["train-siglip", f"data={e.data}", f"resume={e.tmp}",
                                                        f"out_dir={e.tmp / 's'}"], 1,
     r"is not a checkpoint folder \(no progress\.json", 1),
    # merge: the adapter is checked at the door, before the base loads
    ("merge-truncated-adapter", lambda e: ["merge", e.model, _adapter(e, "truncated"), e.tmp / "merged"], 1,
     r"adapter_model\.safetensors could not be read as safetensors .*truncated or damaged", 1),
    ("merge-pickled-adapter", lambda e: ["merge", e.model, _adapter(e, "pickled"), e.tmp / "merged"], 1,
     r"adapter_model\.bin holds more than tensors and plain values", 1),
    # demo
    ("demo-zero-eval-items", lambda e: ["demo", "--n-eval", "0", "--output-dir", e.tmp / "d"], 2,
     r"--n-eval: must be at least 1", 1),
    ("demo-warmup-not-below-steps", lambda e: ["demo", "--vq-steps", "3", "--vq-warmup-steps", "3", "--output-dir",
                                               e.tmp / "d"], 2, r"--vq-warmup-steps must be in \[0, --vq-steps\)", 1),
    ("demo-negative-seed", lambda e: ["demo", "--seed", "-1", "--output-dir", e.tmp / "d"], 2, r"a seed must be in", 1),
    ("demo-zero-stage-steps", lambda e: ["demo", "--stage-steps", "1", "0", "1", "--output-dir", e.tmp / "d"], 2,
     r"--stage-steps: must be at least 1", 1),
    ("demo-unknown-render-style", lambda e: ["demo", "--render-style", "fancy", "--output-dir", e.tmp / "d"], 2,
     r"--render-style: invalid choice: 'fancy'", 1),
]


# ---- issue 35 (doors): sizes, bounds, schedules and destinations ----------------------------------------------

def _edit_section(env: Env, section: str, **changes) -> Path:
    """A copy of the checkpoint whose config.json has ``changes`` in ``section`` (vision, vq, llm)."""
    ckpt = env.copy_model()
    config = json.loads((ckpt / "config.json").read_text())
    config[section] = {**config[section], **changes}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def _vq_size_off_grid(env: Env) -> Path:
    """A VQ image size one pixel past a multiple of the checkpoint's downsampling factor."""
    config = json.loads((env.model / "config.json").read_text())
    return _edit_section(env, "vq", image_size=2 ** (len(config["vq"]["channel_mult"]) - 1) * 4 + 1)


def _unrelated_file(env: Env, text: str = '{"notes": "mine"}') -> Path:
    path = env.tmp / "mine.json"
    path.write_text(text)
    return path


DOORS_CASES = [
    # zero and indivisible sizes in a checkpoint's config.json: named, before any tensor is made
    ("load-config-zero-patch-size", lambda e: gen(e, model=_edit_section(e, "vision", patch_size=0)), 1,
     r"vision\.patch_size must be a whole number >= 1, got 0", 1),
    ("load-config-zero-heads", lambda e: gen(e, model=_edit_section(e, "llm", num_heads=0)), 1,
     r"llm\.num_heads must be a whole number >= 1, got 0", 1),
    ("load-config-negative-codebook", lambda e: gen(e, model=_edit_section(e, "vq", codebook_size=-8)), 1,
     r"vq\.codebook_size must be a whole number >= 1, got -8", 1),
    ("load-config-kv-heads-not-dividing", lambda e: gen(e, model=_edit_section(e, "llm", num_kv_heads=3)), 1,
     r"llm\.num_heads \(\d+\) must be a multiple of llm\.num_kv_heads \(3\)", 1),
    ("load-config-width-not-dividing", lambda e: gen(e, model=_edit_section(e, "vision", num_heads=5)), 1,
     r"vision\.width \(\d+\) must be a multiple of vision\.num_heads \(5\)", 1),
    ("load-config-vq-size-off-grid", lambda e: gen(e, model=_vq_size_off_grid(e)), 1,
     r"vq\.image_size \(\d+\) must be a multiple of the VQ downsampling factor", 1),
    ("load-config-zero-aligner", lambda e: gen(e, model=_edit_config(e, gen_aligner_depth=0)), 1,
     r"config\.gen_aligner_depth must be a whole number >= 1, got 0", 1),
    # the same sizes as recipe and tokenizer-trainer overrides: refused before a run file is written
    ("train-vq-image-size-off-grid", lambda e: train(e, "--output-dir", e.tmp / "r", "model.vq.image_size=7"), 1,
     r"vq\.image_size \(7\) must be a multiple of the VQ downsampling factor", 1),
    ("train-zero-heads", lambda e: train(e, "--output-dir", e.tmp / "r", "model.llm.num_heads=0"), 1,
     r"llm\.num_heads must be a whole number >= 1, got 0", 1),
    ("train-vq-zero-channels", lambda e: ["train-vq", f"data={e.data}", f"out_dir={e.tmp / 'v'}", "vq.base_channels=0",
                                          *VQ_SMALL], 1, r"vq\.base_channels must be a whole number >= 1, got 0", 1),
    # CFG schedules: an argument only where the schedule takes one (refused before the model loads)
    ("generate-linear-schedule-with-argument", lambda e: gen(e, "--cfg-schedule", "linear:5", model=e.tmp / "none"),
     2, r"cfg_schedule 'linear:5': 'linear' takes no argument; only cutoff:K does", 1),
    ("generate-constant-schedule-with-argument", lambda e: gen(e, "--cfg-schedule", "constant:0",
                                                               model=e.tmp / "none"), 2, r"'constant' takes no arg", 1),
    ("generate-cutoff-without-index", lambda e: gen(e, "--cfg-schedule", "cutoff:", model=e.tmp / "none"), 2,
     r"expected cutoff:K with K a token index >= 0", 1),
    ("generate-cutoff-superscript-index", lambda e: gen(e, "--cfg-schedule", "cutoff:²", model=e.tmp / "none"), 2,
     r"expected cutoff:K with K a token index >= 0", 1),
    # decoding windows beyond what the model's image holds
    ("generate-jacobi-window-past-the-image", lambda e: gen(e, "--decoding", "jacobi", "--decoding-option",
                                                            "window=500000"), 2,
     r"window=500000 for 'jacobi' exceeds the image's 16 tokens; choose 1\.\.16", 1),
    ("generate-jacobi-window-one-past", lambda e: gen(e, "--decoding", "jacobi", "--decoding-option", "window=17"), 2,
     r"window=17 for 'jacobi' exceeds the image's 16 tokens", 1),
    ("generate-zipar-window-past-the-row", lambda e: gen(e, "--decoding", "zipar", "--decoding-option", "window=5"),
     2, r"window=5 for 'zipar' exceeds the token grid's row width \(4\)", 1),
    # eval --json: a file that is not an earlier eval result is kept (checked before the model loads)
    ("eval-json-replaces-unrelated-json", lambda e: ev(e, "--json", _unrelated_file(e)), 1,
     r"--json .*mine\.json exists and is not an earlier eval result; pass --overwrite", 1),
    ("eval-json-replaces-unrelated-text", lambda e: ev(e, "--task", "captions", "--json",
                                                       _unrelated_file(e, "my notes\n")), 1,
     r"is not an earlier eval result", 1),
]


@pytest.mark.parametrize("build, code, message, n_errors", [c[1:] for c in CASES + DOORS_CASES],
                         ids=[c[0] for c in CASES + DOORS_CASES])
def test_bad_input(build, code, message, n_errors, model_dir, data, tmp_path, capsys, monkeypatch, request):
    import re

    monkeypatch.delenv("UNIGEN_DEBUG", raising=False)
    marker = tmp_path.parent / f"{tmp_path.name}-payload-ran"
    env = Env(tmp_path, model_dir, data, request, marker)
    argv = build(env)
    capsys.readouterr()  # what building the case printed
    before = tree_hashes(tmp_path, model_dir, data.parent)
    got, out, err = run_cli(argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert got == code, (got, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    assert len(errors) == n_errors, err[-2000:]
    assert re.search(message, errors[-1]), errors[-1]
    assert tree_hashes(tmp_path, model_dir, data.parent) == before  # nothing written, replaced or removed
    assert not marker.exists(), "a pickled payload ran"


def test_debug_flag_and_environment_show_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["generate", "x", "--model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o")]
    from unigen.errors import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        main([*argv, "--debug"])
    monkeypatch.setenv("UNIGEN_DEBUG", "1")
    with pytest.raises(CheckpointNotFoundError):
        main(argv)
    monkeypatch.setenv("UNIGEN_DEBUG", "0")
    assert main(argv) == 1 and capsys.readouterr().err.startswith("error: checkpoint directory")


# ---- one test per defect of issue 23 beyond the table ------------------------------------------------------

def test_training_state_files_load_without_running_code(finished_run, vq_run):
    """Defect 1: every file a resume reads loads with ``weights_only=True`` (RNG and optimizer state included)."""
    files = sorted(finished_run.rglob("*.pt")) + sorted(vq_run.rglob("*.pt"))
    assert {p.name for p in files} >= {"optimizer.pt", "rng_0.pt", "task.pt"}
    for path in files:
        torch.load(path, weights_only=True)


def test_generate_overwrite_replaces_the_earlier_run_and_leaves_no_stale_image(model_dir, tmp_path, capsys):
    """Defect 2: ``--overwrite`` is the only way into a folder with images, and then none of the old ones stay."""
    common = ["generate", "a red circle", "--model", model_dir, "--device", "cpu", "--output-dir", tmp_path]
    assert run_cli([*common, "--num-images", "3"], capsys)[0] == 0
    assert run_cli([*common, "--num-images", "1", "--seed", "7"], capsys)[0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "image_000.png", "image_001.png",
                                                         "image_002.png"]
    code, _, err = run_cli([*common, "--num-images", "1", "--seed", "7", "--overwrite", "--no-grid"], capsys)
    assert code == 0 and "removed 3 image(s) of the earlier run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_000.png"]


def test_torn_last_metrics_line_is_dropped_on_resume(data, tmp_path, capsys, caplog):
    """Defect 3: a half-written last line of metrics.jsonl (full disk, kill) does not block the run folder."""
    out = tmp_path / "run"
    args = [*TRAIN, "--stage", "1", f"data={data}", "--output-dir", out, "stage1.steps=3", "stage1.batch_size=2"]
    assert run_cli([*args, "--max-steps", "2"], capsys)[0] == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "stage": 1, "lo')
    code, _, err = run_cli([*args, "--resume", "latest"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "dropping its torn last line" in caplog.text


def test_non_finite_numbers_are_rejected_by_the_api(model_dir):
    """Defect 4: the Python API, config.json defaults and recipes refuse NaN and infinity too."""
    from unigen.config import UniGenConfig
    from unigen.errors import ArgumentError, ConfigError
    from unigen.generation.pipeline import UniGenPipeline
    from unigen.generation.sampling_options import check_sampling_args
    from unigen.training import load_recipe

    pipe = UniGenPipeline.from_pretrained(model_dir)
    for kwargs in ({"guidance_scale": float("nan")}, {"guidance_scale": float("inf")},
                   {"temperature": float("nan")}, {"top_p": float("nan")}):
        with pytest.raises(ArgumentError, match="must be a finite number"):
            pipe("a red circle", **kwargs)
    with pytest.raises(ArgumentError, match="temperature must be a finite number"):
        pipe.caption(Image.new("RGB", (8, 8)), temperature=float("inf"))
    with pytest.raises(ArgumentError, match="guidance_scale must be a finite number"):
        check_sampling_args(1.0, None, None, guidance_scale=float("-inf"))
    config = json.loads((model_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="config.temperature must be a finite number"):
        UniGenConfig.from_dict({**config, "temperature": float("nan")})
    with pytest.raises(ConfigError, match="config.llm.rope_theta must be a finite number"):
        UniGenConfig.from_dict({**config, "llm": {**config["llm"], "rope_theta": float("inf")}})
    with pytest.raises(ConfigError, match="stage2.min_lr_ratio must be a finite number"):
        load_recipe(SMOKE, ["stage2.min_lr_ratio=.inf"])
    with pytest.raises(ConfigError, match="lr_mult.llm must be a finite number"):
        load_recipe(SMOKE, ["stage2.lr_mult={llm: .nan}"])


def test_generate_and_caption_work_in_bounded_batches(model_dir, tmp_path, capsys, monkeypatch):
    """Defect 5: images are drawn ``--batch-size`` at a time (the same images as one batch), and captioning
    reads each batch of files just before captioning it."""
    from unigen import processor
    from unigen.generation.pipeline import UniGenPipeline

    events = []
    call, caption, load = UniGenPipeline.__call__, UniGenPipeline.caption, processor.load_image
    def draw(self, *args, **kwargs):
        events.append(("draw", kwargs["num_images_per_prompt"]))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(UniGenPipeline, "__call__", draw)
    common = ["generate", "a red circle", "--model", model_dir, "--device", "cpu", "--num-images", "5", "--no-grid"]
    assert run_cli([*common, "--batch-size", "2", "--output-dir", tmp_path / "a"], capsys)[0] == 0
    assert events == [("draw", 2), ("draw", 2), ("draw", 1)]
    assert run_cli([*common, "--batch-size", "8", "--output-dir", tmp_path / "b"], capsys)[0] == 0
    for i in range(5):
        a, b = (Image.open(tmp_path / d / f"image_{i:03d}.png") for d in "ab")
        assert a.tobytes() == b.tobytes(), i

    events.clear()
    monkeypatch.setattr(UniGenPipeline, "caption",
                        lambda self, images, **k: events.append(("caption", len(images))) or caption(self, images, **k))

    def read(image):
        if isinstance(image, Path):  # a file read (the processor also passes decoded images through)
            events.append(("read", image.name))
        return load(image)

    monkeypatch.setattr(processor, "load_image", read)
    paths = [tmp_path / "a" / f"image_{i:03d}.png" for i in range(3)]
    code, out, _ = run_cli(["caption", *paths, "--model", model_dir, "--device", "cpu", "--max-new-tokens", "2",
                            "--batch-size", "2"], capsys)
    assert code == 0 and out.count("\n") == 3
    assert events == [("read", "image_000.png"), ("read", "image_001.png"), ("caption", 2),
                      ("read", "image_002.png"), ("caption", 1)]


def test_caption_names_every_unreadable_input_and_captions_the_rest(model_dir, tmp_path, capsys, monkeypatch):
    """Defect 6: a folder and an image too large for Pillow among good ones: both named, the good ones done."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # so that a 24 x 24 image is "too large"
    good = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in good:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (24, 24)).save(huge)
    code, out, err = run_cli(["caption", good[0], tmp_path, huge, good[1], "--model", model_dir, "--device", "cpu",
                              "--max-new-tokens", "2"], capsys)
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(p) for p in good]
    assert "is a directory" in err and "huge.png is too large to decode safely" in err
    assert err.splitlines()[-1] == f"error: 2 image(s) could not be read: {tmp_path}, {huge}"


def test_resume_latest_with_nothing_to_resume_says_so(data, tmp_path, capsys, caplog):
    """Defect 8: ``--resume latest`` into an empty folder trains from scratch, and says so."""
    code, _, _ = run_cli([*TRAIN, "--stage", "1", f"data={data}", "--output-dir", tmp_path, "stage1.steps=1",
                          "stage1.batch_size=2", "--resume", "latest"], capsys)
    assert code == 0
    assert "--resume latest: nothing to resume under" in caplog.text and "starting from step 0" in caplog.text


def test_api_errors_name_the_problem(model_dir):
    """Defect 9 in the Python API: an empty batch, a prompt that is not text, a bad image count."""
    from unigen.errors import ArgumentError
    from unigen.generation.pipeline import UniGenPipeline

    pipe = UniGenPipeline.from_pretrained(model_dir)
    with pytest.raises(ArgumentError, match="no images given"):
        pipe.caption([])
    with pytest.raises(ArgumentError, match="no prompts given"):
        pipe([])
    with pytest.raises(ArgumentError, match="the prompt is not valid UTF-8"):
        pipe("a \udcff")
    with pytest.raises(ArgumentError, match="num_images_per_prompt must be a whole number >= 1, got 0"):
        pipe("a cat", num_images_per_prompt=0)
    with pytest.raises(ArgumentError, match="max_new_tokens must be a whole number >= 1"):
        pipe.caption(Image.new("RGB", (8, 8)), max_new_tokens=0)


# ---- issue 35 (doors): beyond the table ----------------------------------------------------------------------

def test_chat_image_without_a_path_says_so_and_the_conversation_goes_on(model_dir, tmp_path, capsys, monkeypatch):
    import io

    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "red.png")
    lines = ["/image", "/image   ", "/imagine", f"/image {tmp_path / 'red.png'}", "what is it?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = run_cli(["chat", "--model", model_dir, "--device", "cpu", "--max-new-tokens", "2"], capsys)
    assert code == 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors[:2] == ["error: /image needs a path, e.g. /image photo.png"] * 2
    assert errors[2].startswith("error: unknown command '/imagine'") and len(errors) == 3
    assert "is a directory" not in err and f"(image {tmp_path / 'red.png'} attached" in err
    assert out.count("assistant> ") == 1


def test_eval_json_replaces_only_its_own_results_unless_overwrite(model_dir, tmp_path, capsys):
    target = tmp_path / "scores.json"
    run = lambda *flags: run_cli(["eval", "shapes", "--model", model_dir, "--device", "cpu", "--n", "2",
                                  "--task", "captions", "--json", target, *flags], capsys)
    assert run()[0] == 0
    first = json.loads(target.read_text())
    assert first["n"] == 2 and "captioning" in first
    assert run("--seed", "1")[0] == 0  # an earlier eval result is replaced without asking
    assert json.loads(target.read_text())["seed"] == 1
    target.write_text('{"model": "x", "n": 1, "seed": 0}')  # the keys of a result, but no scores: not one
    code, _, err = run()
    assert code == 1 and "is not an earlier eval result" in err
    assert run("--overwrite")[0] == 0 and "captioning" in json.loads(target.read_text())


def test_shapes_evaluation_streams_batches_and_scores_exactly_as_one_batch(model_dir, monkeypatch):
    """``unigen eval shapes --n``: each batch is rendered, run and scored before the next is rendered (memory
    does not grow with n), and the running total equals the scores of one batch of every item."""
    from unigen.generation.pipeline import UniGenPipeline
    from unigen.generation.sampling_options import SamplingOptions
    from unigen.shapes import evaluate

    pipe = UniGenPipeline.from_pretrained(model_dir)
    greedy = SamplingOptions(temperature=0.0)  # the same images whatever the batch size
    whole = [evaluate.evaluate_captions(pipe, 5, seed=1, batch_size=5)[0],
             evaluate.evaluate_generation(pipe, 5, seed=1, batch_size=5, options=greedy)[0],
             evaluate.evaluate_edits(pipe, 5, seed=1, batch_size=5, options=greedy)[0]]
    events = []
    render, call, caption, edit = evaluate.render, UniGenPipeline.__call__, UniGenPipeline.caption, UniGenPipeline.edit
    monkeypatch.setattr(evaluate, "render", lambda *a, **k: events.append("render") or render(*a, **k))
    monkeypatch.setattr(UniGenPipeline, "__call__", lambda self, p, **k: events.append(len(p)) or call(self, p, **k))
    monkeypatch.setattr(UniGenPipeline, "caption", lambda self, i, **k: events.append(len(i)) or caption(self, i, **k))
    monkeypatch.setattr(UniGenPipeline, "edit", lambda self, i, *a, **k: events.append(len(i)) or
                        edit(self, i, *a, **k))
    streamed = [evaluate.evaluate_captions(pipe, 5, seed=1, batch_size=2, keep=False),
                evaluate.evaluate_generation(pipe, 5, seed=1, batch_size=2, options=greedy, keep=False),
                evaluate.evaluate_edits(pipe, 5, seed=1, batch_size=2, options=greedy, keep=False)]
    assert [scores for scores, _ in streamed] == whole
    assert all(records == [] for _, records in streamed)
    per_batch = ["render", "render", 2, "render", "render", 2, "render", 1]
    assert events == per_batch + [2, 2, 1] + per_batch


def test_merged_scores_equal_the_scores_of_all_items():
    from unigen.shapes.editing import sample_edits
    from unigen.shapes.metrics import caption_accuracy, edit_accuracy, merge_scores
    from unigen.shapes.render import render
    from unigen.shapes.world import caption, sample_specs

    specs = sample_specs(13, seed=4)
    texts = [caption(s) if i % 3 else "a small red square at the center" for i, s in enumerate(specs)]
    whole = caption_accuracy(zip(specs, texts))
    parts = [caption_accuracy(zip(specs[i : i + 4], texts[i : i + 4])) for i in range(0, 13, 4)]
    assert merge_scores(parts) == whole and json.dumps(merge_scores(parts)) == json.dumps(whole)
    edits = sample_edits(7, seed=2)
    outputs = [render(e.target if i % 2 else e.source, seed=i).pil() for i, e in enumerate(edits)]
    whole = edit_accuracy(zip(edits, outputs))
    assert merge_scores([edit_accuracy(zip(edits[:3], outputs[:3])), edit_accuracy(zip(edits[3:], outputs[3:]))]) \
        == whole
