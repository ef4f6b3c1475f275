"""Do the VQ and SigLIP trainers of two unigen trees train the same weights, to the last bit?

    python benchmarks/tokenizer_parity.py --ref /tmp/ref      # /tmp/ref: a checkout of the tree to compare with

The reference may predate the December layout change (the trainers in ``unigen/tokenizer_training/``).

Each tree trains a small VQ (LR warm-up + cosine, autoencoder warm-up + k-means, dead-code re-seeding) and a
small SigLIP on the same images, one thread, the same seed, in its own process (PYTHONPATH picks the tree).
Prints both loss curves side by side and whether every saved weight is ``torch.equal``; exits 1 if not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(steps=16, batch_size=4, warmup_steps=3, lr_schedule="cosine", val_size=4, log_every=1, eval_every=8,
              save_every=8, device="cpu", seed=3)
VQ = dict(COMMON, lr=3e-3, ae_warmup_steps=4, kmeans_batches=2, kmeans_iters=3, usage_window=5, sample_images=2,
          vq=dict(image_size=16, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, z_channels=16, embed_dim=4,
                  codebook_size=32, norm_groups=4))
SIGLIP = dict(COMMON, lr=3e-3, embed_dim=32, vision=dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=2),
              text=dict(width=32, depth=1, num_heads=2, max_len=8))
TRAIN = """
import json, sys, torch, unigen
print(unigen.__file__, flush=True)
torch.set_num_threads(1)
from unigen.config_io import load_config
from {package}.{module} import {config} as Config, {fn} as train
train(load_config(Config, **json.loads(sys.argv[1])))
"""


def write_images(root: Path, n: int = 20) -> Path:
    g = torch.Generator().manual_seed(0)
    rows = []
    (root / "img").mkdir(parents=True)
    for i in range(n):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"picture {i % 5} of {['red', 'blue'][i % 2]}"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


def train(tree: Path, kind: str, values: dict, out: Path) -> Path:
    module, config, fn = {"vq": ("vq_trainer", "VQTrainConfig", "train_vq"),
                          "siglip": ("siglip_trainer", "SigLIPTrainConfig", "train_siglip")}[kind]
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    package = "unigen.tokenizer_training" if (tree / "unigen" / "tokenizer_training").is_dir() else \
        "unigen.training.tokenizer"
    code = TRAIN.format(package=package, module=module, config=config, fn=fn)
    # cwd: ``python -c`` puts the working folder before PYTHONPATH, so run from elsewhere the other tree would
    # import this one
    done = subprocess.run([sys.executable, "-c", code, json.dumps({**values, "out_dir": str(out)})], env=env,
                          cwd=tree, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"training the {kind} in {tree} failed:\n{done.stderr[-3000:]}")
    imported = Path(done.stdout.splitlines()[0]).resolve()
    if not imported.is_relative_to(tree.resolve()):
        sys.exit(f"the {kind} run meant for {tree} imported unigen from {imported}")
    return out


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


def compare(name: str, ref: Path, new: Path) -> bool:
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(new / "model.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{name}: step  loss(ref)            loss(new)")
    for i, (x, y) in enumerate(zip(losses(ref), losses(new), strict=True), 1):
        print(f"{name}: {i:4d}  {x!r:<20} {y!r:<20}{'' if x == y else '  DIFFERS'}")
    print(f"{name}: saved weights {'bitwise equal' if same else 'DIFFER'} ({len(a)} tensors)")
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", type=Path, required=True, help="the other unigen tree (its root folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = str(write_images(tmp))
        ok = True
        for kind, values in (("vq", VQ), ("siglip", SIGLIP)):
            values = dict(values, data=data)
            ok &= compare(kind, train(args.ref, kind, values, tmp / f"{kind}-ref"),
                          train(ROOT, kind, values, tmp / f"{kind}-new"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
