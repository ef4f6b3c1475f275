"""Stage-II training throughput and peak memory: with and without gradient checkpointing, or (``--lora``) a full
fine-tune against LoRA (r 16 on the LLM's projections) at the same batch.

Each configuration runs in its own process (peak RSS is per process; on CUDA the peak allocated memory; with
``--lora`` the peak of the training steps, after the model has loaded).

    python benchmarks/bench_train.py --threads 2 --steps 20
    python benchmarks/bench_train.py --lora --threads 2 --layers 8 --batch 8 --steps 4   # Janus-Pro-1B width

``--lora`` trains stage II of the Shapes recipe's data with the LLM at Janus-Pro-1B's block shape (width 2048,
SwiGLU 5632, 16 heads; ``--layers`` of them, as many as fit; the Shapes word vocabulary) from one saved
checkpoint, both runs through ``unigen train``'s own loop; the first step is not timed.
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
    from unigen.training import load_recipe, run_stage

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


JANUS_PRO_1B_BLOCKS = ["model.llm.hidden_size=2048", "model.llm.intermediate_size=5632", "model.llm.num_heads=16",
                       "model.llm.num_kv_heads=16", "model.gen_head_dim=2048"]


def lora_base(args, tmp: Path) -> tuple[Path, Path]:
    """(data manifest, saved start checkpoint) at the benchmark's size; built in a child so its memory is gone."""
    from unigen.data.manifest import read_samples
    from unigen.shapes import write_dataset
    from unigen.training import load_recipe
    from unigen.training.start import build_fresh

    data = write_dataset(tmp / "data", 64, seed=1)
    recipe = load_recipe(REPO / "train" / "shapes.yaml", [f"data={data}", f"output_dir={tmp}/fresh",
                                                          *JANUS_PRO_1B_BLOCKS, f"model.llm.num_layers={args.layers}"])
    model, processor = build_fresh(recipe, read_samples(data))
    model.save_pretrained(tmp / "base")
    processor.save_pretrained(tmp / "base")
    return data, tmp / "base"


def _peak_rss_mib() -> float:
    """The process's resident-set high-water mark (Linux ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lora_child(args) -> None:
    import torch

    import unigen.training.checkpoints as ckpt
    import unigen.training.loop as loop
    from unigen.training import load_recipe, run_stage

    torch.set_num_threads(args.threads)
    tmp = Path(args.tmp)
    overrides = [f"data={tmp / 'data' / 'train.jsonl'}", f"output_dir={tmp}/{args.mode}", "tensorboard=false",
                 f"stage2.steps={args.steps}", f"stage2.batch_size={args.batch}", "stage2.mixture=[1,0,1]",
                 "stage2.warmup_steps=0", f"device={args.device}"]
    if args.mode == "lora":
        overrides.append("stage2.lora={r: 16, alpha: 32, targets: [llm]}")
    # The steps' peak, not the loader's: the high-water mark is reset once the model and optimizer exist (loading
    # a checkpoint briefly holds two copies of the weights) and read before the final weights are written.
    peaks = {}
    make_scheduler, save_final = loop.make_scheduler, ckpt.save_final  # looked up in loop.py at run time

    def reset_peak(*a, **k):
        peaks["load"] = _peak_rss_mib()
        Path("/proc/self/clear_refs").write_text("5")
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return make_scheduler(*a, **k)

    def read_peak(*a, **k):
        peaks["steps"] = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else _peak_rss_mib()
        return save_final(*a, **k)

    loop.make_scheduler, ckpt.save_final = reset_peak, read_peak
    run_stage(load_recipe(REPO / "train" / "shapes.yaml", overrides), 2, init_from=str(tmp / "base"), progress=False)
    rows = [json.loads(x) for x in (tmp / args.mode / "metrics.jsonl").read_text().splitlines()]
    timed = sorted(r["samples_per_s"] for r in rows[1:])  # the first step warms up allocator and kernels
    print(json.dumps({"samples_per_s": timed[len(timed) // 2], "peak_mib": peaks["steps"],
                      "load_peak_mib": peaks["load"]}))


def lora_main(args) -> None:
    import torch

    from unigen import UniGenModel
    from unigen.training.lora import LoraSettings, attach

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--lora", "--layers", str(args.layers), "--tmp", tmp, "--mode",
                        "base"], check=True)
        model = UniGenModel.from_pretrained(Path(tmp) / "base", device="cpu")
        total, llm = model.num_parameters(), sum(p.numel() for p in model.language_model.parameters())
        attach(model, LoraSettings(r=16, alpha=32, targets=["llm"]), "lora")
        adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        del model
        torch.set_num_threads(args.threads)
        print(f"stage II, LLM blocks at Janus-Pro-1B width (2048) x {args.layers} layers, batch {args.batch}, "
              f"{args.steps} steps (first untimed), threads {args.threads}, {args.device}")
        print(f"adapters (r 16, LLM projections): {adapters} params = {100 * adapters / total:.2f}% of the model's "
              f"{total}, {100 * adapters / llm:.2f}% of the LLM's {llm}")
        results = {}
        for mode in ("full", "lora"):
            out = subprocess.run([sys.executable, __file__, "--lora", "--layers", str(args.layers), "--tmp", tmp,
                                  "--mode", mode, "--threads", str(args.threads), "--steps", str(args.steps),
                                  "--batch", str(args.batch), "--device", args.device],
                                 capture_output=True, text=True, check=True).stdout
            r = results[mode] = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:>4}: {r['samples_per_s']:.3f} samples/s, peak memory of the steps {r['peak_mib']:.0f} MiB "
                  f"(while loading the checkpoint: {r['load_peak_mib']:.0f} MiB)")
    a, b = results["full"], results["lora"]
    print(f"LoRA / full: {b['peak_mib'] / a['peak_mib']:.2f}x peak memory, "
          f"{b['samples_per_s'] / a['samples_per_s']:.2f}x samples/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lora", action="store_true", help="full fine-tune vs LoRA at Janus-Pro-1B width")
    p.add_argument("--layers", type=int, default=8, help="--lora: decoder blocks (as many as fit)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--lora: where to train")
    p.add_argument("--checkpointing", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode == "base":
        return lora_base(args, Path(args.tmp))
    if args.mode is not None:
        return lora_child(args)
    if args.lora:
        return lora_main(args)
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
