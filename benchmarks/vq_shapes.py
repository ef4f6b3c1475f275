"""Train the Shapes VQ recipe and report steps/s, PSNR and the checker's accuracy on reconstructions.

    python benchmarks/vq_shapes.py [--threads 2] [--train-n 6000] [--test-n 300] [key=value ...]

key=value overrides go to the recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unigen.config_io import load_config
from unigen.shapes import write_dataset
from unigen.training.tokenizer.shapes_recon import vq_checker_accuracy
from unigen.training.tokenizer.vq_trainer import VQTrainConfig, VQTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tokenizers/vq-shapes.yaml")
    ap.add_argument("--data-dir", default="runs/bench-shapes-data")
    ap.add_argument("--train-n", type=int, default=6000)
    ap.add_argument("--test-n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir)
    train = data / "train.jsonl"
    test = data / "test.jsonl"
    if not train.is_file():
        write_dataset(data, args.train_n, seed=1, split="train")
    if not test.is_file():
        write_dataset(data, args.test_n, seed=2, split="test")
    cfg = load_config(VQTrainConfig, args.config, [f"data={train}", "out_dir=runs/bench-vq-shapes", *args.overrides])
    trainer = VQTrainer(cfg)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    result = {"steps": cfg.steps, "batch_size": cfg.batch_size, "train_seconds": round(seconds, 1),
              "steps_per_s": round(cfg.steps / seconds, 3), "device": str(trainer.device),
              "amp": trainer.amp, "threads": args.threads,
              "recon_check": vq_checker_accuracy(trainer.model, test)}
    (Path(cfg.out_dir) / "recon_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
