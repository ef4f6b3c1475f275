"""Decode ms/token: a dense decoder vs an MoE one with the same active feed-forward width per token.

Dense: the Shapes preset's LLM (width 256, SwiGLU 688, 4 layers). MoE: 8 experts of 172 (a quarter of 688), the top
3 routed, plus one shared expert of 172 behind a sigmoid gate: 4 x 172 = 688 active per token, as dense. Random
weights (routers drawn wide so tokens spread). Each row count:
a 32-token prefill, then ``--steps`` single-token KV-cached decode steps, the dense and the MoE step timed
alternately, median CPU ms per step (the process's CPU time, which other processes on a shared machine inflate less
than wall time). ``--images N`` times 2N rows: N images, each with its CFG row fed the same token; one step is one
token of every image.

    .venv/bin/python benchmarks/bench_moe.py --threads 1 --images 1 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unigen.config import LLMConfig, MoEConfig  # noqa: E402
from unigen.models.decoder import CausalLM  # noqa: E402
from unigen.models.moe import MoEFeedForward  # noqa: E402

DENSE = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4,
             max_position_embeddings=1024)
MOE = MoEConfig(num_experts=8, top_k=3, expert_size=172, num_shared_experts=1, shared_expert_gate=True)
PREFILL = 32


def step_timer(lm: CausalLM, rows: int, steps: int):
    """A prefilled cache and a function that runs one decode step on it and returns its seconds."""
    decoder = lm.model
    cache = decoder.new_cache(rows, PREFILL + steps)
    decoder(decoder.embed_tokens(torch.randint(0, DENSE["vocab_size"], (rows, PREFILL))), cache=cache)

    def step() -> float:
        tokens = torch.randint(0, DENSE["vocab_size"], (rows // 2, 1)).repeat_interleave(2, 0)  # an image, its CFG row
        x = decoder.embed_tokens(tokens)
        t0 = time.process_time()
        decoder(x, cache=cache)
        return time.process_time() - t0

    return step


@torch.no_grad()
def decode_ms(models: dict[str, CausalLM], rows: int, steps: int) -> dict[str, float]:
    warmup = 5
    timers = {name: step_timer(lm, rows, steps + warmup) for name, lm in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(steps + warmup):
        for name, step in timers.items():
            seconds = step()
            if i >= warmup:
                times[name].append(seconds)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--images", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"dense": CausalLM(LLMConfig(**DENSE)).eval(), "moe": CausalLM(LLMConfig(**DENSE, moe=MOE)).eval()}
    for layer in models["moe"].modules():
        if isinstance(layer, MoEFeedForward):
            layer.gate.weight.data.normal_()
    params = {k: sum(p.numel() for p in m.model.layers.parameters()) for k, m in models.items()}
    print(f"block parameters: dense {params['dense']:,}, moe {params['moe']:,} (active per token as dense); "
          f"{args.threads} thread(s), {args.steps} steps")
    print("| images (rows) | dense CPU ms/step | MoE CPU ms/step | MoE / dense |")
    print("|---|---|---|---|")
    for images in args.images:
        ms = decode_ms(models, 2 * images, args.steps)
        print(f"| {images} ({2 * images}) | {ms['dense']:.2f} | {ms['moe']:.2f} | {ms['moe'] / ms['dense']:.2f} |")


if __name__ == "__main__":
    main()
