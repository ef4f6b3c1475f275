"""Decode ms/token: a dense decoder vs an MoE one with the same active feed-forward width per token.

Dense: the Shapes preset's LLM (width 256, SwiGLU 688, 4 layers). MoE: 8 experts of 172 (a quarter of 688), the top
3 routed, plus one shared expert of 172 behind a sigmoid gate: 4 x 172 = 688 active per token, as dense. Random
weights (routers drawn wide so tokens spread). Each row: a 32-token prefill, then ``--steps`` single-token KV-cached
decode steps, median ms per step; ``rows`` 1 = text, 2 = one image with its CFG row.

    .venv/bin/python benchmarks/bench_moe.py --threads 1
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


@torch.no_grad()
def decode_ms(lm: CausalLM, rows: int, steps: int) -> float:
    decoder = lm.model
    cache = decoder.new_cache(rows, 32 + steps)
    decoder(decoder.embed_tokens(torch.randint(0, 1024, (rows, 32))), cache=cache)
    times = []
    for _ in range(steps):
        x = decoder.embed_tokens(torch.randint(0, 1024, (rows, 1)))
        t0 = time.perf_counter()
        decoder(x, cache=cache)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"dense": CausalLM(LLMConfig(**DENSE)).eval(), "moe": CausalLM(LLMConfig(**DENSE, moe=MOE)).eval()}
    for layer in models["moe"].modules():
        if isinstance(layer, MoEFeedForward):
            layer.gate.weight.data.normal_()
    params = {k: sum(p.numel() for p in m.model.layers.parameters()) for k, m in models.items()}
    print(f"block parameters: dense {params['dense']:,}, moe {params['moe']:,} (active per token as dense)")
    print("| rows | dense ms/token | MoE ms/token | MoE / dense |")
    print("|---|---|---|---|")
    for rows in (1, 2):
        decode_ms(models["dense"], rows, 10), decode_ms(models["moe"], rows, 10)  # warm-up
        dense, moe = decode_ms(models["dense"], rows, args.steps), decode_ms(models["moe"], rows, args.steps)
        print(f"| {rows} | {dense:.2f} | {moe:.2f} | {moe / dense:.2f} |")


if __name__ == "__main__":
    main()
