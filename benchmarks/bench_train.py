"""Stage-II training throughput and peak memory, with and without gradient checkpointing.

Each configuration runs in its own process (peak RSS is per process) on the Shapes recipe's model.

    python benchmarks/bench_train.py --threads 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args) -> None:
    import torch

    from unigen.shapes import write_dataset
    from unigen.train import load_recipe, run_stage

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "data", 256, seed=1)
        recipe = load_recipe(REPO / "train" / "shapes.yaml", [
            f"data={data}", f"output_dir={tmp}/run", "stage1.steps=1", f"stage2.steps={args.steps}",
            f"stage2.batch_size={args.batch}", f"grad_checkpointing={args.checkpointing}", "stage2.mixture=[1,0,1]"])
        run_stage(recipe, 1, progress=False)
        start = time.perf_counter()
        run_stage(recipe, 2, progress=False)
        seconds = time.perf_counter() - start
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        tokens = sum(r["tokens"] for r in rows if r["stage"] == 2)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples_per_s": args.steps * args.batch / seconds, "tokens_per_s": tokens / seconds,
                      "peak_rss_mib": peak_mib}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--checkpointing", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.checkpointing is not None:
        args.checkpointing = args.checkpointing == "true"
        return child(args)
    print(f"stage II, Shapes recipe model, batch {args.batch}, {args.steps} steps, threads {args.threads}")
    results = {}
    for ckpt in ("false", "true"):
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--steps", str(args.steps),
                              "--batch", str(args.batch), "--checkpointing", ckpt],
                             capture_output=True, text=True, check=True).stdout
        results[ckpt] = json.loads(out.strip().splitlines()[-1])
        r = results[ckpt]
        print(f"grad checkpointing {ckpt:>5}: {r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tokens/s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    a, b = results["false"], results["true"]
    print(f"checkpointing: {b['samples_per_s'] / a['samples_per_s']:.2f}x throughput, "
          f"{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
