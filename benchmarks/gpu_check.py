"""The GPU check: decode speed of the Janus-Pro-1B shape (bench_sampling's ``--gpu`` shape, random weights) in
one short run, printed as the markdown table of docs/PERFORMANCE.md ("GPU check").

Rows: bf16 eager and with the captured step (a CUDA graph), int8 / int4 weight-only and float8 (torchao), a
float8 KV cache, fp32 weights with their own and a bf16 KV cache, and int8 weight-only / int8-dynamic of fp32;
columns: ms per decode step at 1 and 16 images (each step draws one token of every image, classifier-free guidance
doubles the rows), the linear weights' and the cache's bytes, and peak GPU memory. A row the device cannot run
says why instead of a number.

    python benchmarks/gpu_check.py                     # one GPU, under 3 minutes on an H100
    python benchmarks/gpu_check.py --device cpu --tiny # every row at the smoke preset's size, in seconds
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, replace

import torch

from unigen import UniGenModel
from unigen.config import LLMConfig, UniGenConfig
from unigen.errors import ArgumentError
from unigen.generation.sampling import generate_image_tokens
from unigen.generation.sampling_options import SamplingOptions
from unigen.models.quantize import linear_weight_bytes
from unigen.testing import TINY_TOKENS


@dataclass(frozen=True)
class Row:
    name: str
    dtype: str = "bfloat16"  # the weights' load dtype
    captured: bool = True
    quantize: str | None = None
    kv_cache_dtype: str | None = None


ROWS = (
    Row("bf16 eager", captured=False),
    Row("bf16 captured"),
    Row("int8 weight-only", quantize="int8-weight-only"),
    Row("int4 weight-only (g128)", quantize="int4-weight-only"),
    Row("float8 (dynamic, per row)", quantize="float8"),
    Row("bf16 + float8 KV cache", kv_cache_dtype="float8_e4m3fn"),
    Row("fp32 captured", dtype="float32"),
    Row("fp32 + bf16 KV cache", dtype="float32", kv_cache_dtype="bfloat16"),
    Row("fp32 int8 weight-only", dtype="float32", quantize="int8-weight-only"),  # CPU's usual case
    Row("fp32 int8-dynamic", dtype="float32", quantize="int8-dynamic"),
)


def build(args, device: torch.device) -> UniGenModel:
    """Random weights of the Janus-Pro-1B shape (``UniGenConfig()``: width 2048, 24 layers, 576 image tokens),
    of the smoke preset (``--tiny``), or of bench_sampling's CPU shape (``--width 512 --layers 8``), built in
    place on ``device``; ``--tokens`` shortens the image."""
    smoke = UniGenConfig.from_name("smoke")  # the encoders a decode step does not run stay small
    if args.tiny:  # 4 x 4 image tokens: the test runs every row in a few seconds
        config = replace(smoke, tokens=TINY_TOKENS, vq=replace(smoke.vq, image_size=16))
    elif args.width:  # bench_sampling's CPU model: 24 x 24 tokens of a 16384-code book
        llm = LLMConfig(vocab_size=32000, hidden_size=args.width, intermediate_size=2 * args.width,
                        num_layers=args.layers, num_heads=args.width // 64, num_kv_heads=args.width // 64)
        config = replace(smoke, llm=llm, tokens=TINY_TOKENS, gen_head_dim=args.width,
                         vq=replace(smoke.vq, codebook_size=16384, image_size=24 * smoke.vq.downsample))
    else:
        config = UniGenConfig()
    if args.tokens:
        config = replace(config, vq=replace(config.vq, image_size=int(args.tokens**0.5) * config.vq.downsample))
    torch.manual_seed(0)
    with torch.device(device):
        return UniGenModel(config).eval()


PROMPT_LEN = 14


def step_ms(model, images: int, device: torch.device, captured: bool) -> float:
    """ms per decode step of one image-token generation of ``images`` images, after one warm-up run.
    ``captured``: the sampler's choice (a CUDA graph on CUDA; on CPU the eager step, as torch.compile there
    costs more than it saves); else always eager."""
    tokens = model.config.tokens
    ids = torch.tensor([[tokens.bos, *range(20, 18 + PROMPT_LEN), tokens.image_start]], device=device)
    ids = ids.repeat(images, 1)
    options = SamplingOptions(guidance_scale=5.0)
    run = lambda: generate_image_tokens(model, ids, options=options, compile=None if captured else False,  # noqa: E731
                                        generator=torch.Generator(device).manual_seed(0))
    run()  # warm-up: the capture, the allocator, the kernels' first calls
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return 1000 * (time.perf_counter() - start) / model.config.vq.num_tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(row: Row, base: UniGenModel, device: torch.device, batches: list[int]) -> list[str]:
    """The row's table cells; a scheme or dtype the device lacks gives its one-line reason instead."""
    model = copy.deepcopy(base).to(getattr(torch, row.dtype))
    model.decoder.kv_cache_dtype = None if row.kv_cache_dtype is None else getattr(torch, row.kv_cache_dtype)
    try:
        if row.quantize:
            model.quantize(row.quantize)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            timings = [step_ms(model, n, device, row.captured) for n in batches]
    except (ArgumentError, RuntimeError, NotImplementedError) as err:
        return [row.name, f"skipped: {str(err).splitlines()[0][:150]}"] + [""] * (len(batches) + 2)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "-"
    cache = model.decoder.new_cache(2 * batches[-1], PROMPT_LEN + model.config.vq.num_tokens)
    return [row.name, *(f"{ms:.2f}" for ms in timings), f"{linear_weight_bytes(model) / 2**20:.3g} MiB",
            f"{(cache.k.nbytes + cache.v.nbytes) / 2**20:.3g} MiB", peak]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="where to run (default cuda)")
    p.add_argument("--tiny", action="store_true", help="the smoke preset's size (16 image tokens), not Janus-Pro-1B's")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="images per run (default 1 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    p.add_argument("--width", type=int, default=None, help="a decoder of this width instead (default: none)")
    p.add_argument("--layers", type=int, default=8, help="its layers, with --width (default 8)")
    p.add_argument("--tokens", type=int, default=None, help="image tokens, a square (default: the model's)")
    p.add_argument("--rows", nargs="+", default=None, help="only the rows whose names start so (default: all)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = build(args, device).to(torch.bfloat16)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    shape = "smoke preset" if args.tiny else f"width {args.width}" if args.width else "Janus-Pro-1B shape"
    print(f"GPU check: {shape} ({base.num_parameters() / 1e9:.2f} B "
          f"parameters), {base.config.vq.num_tokens} image tokens, guidance 5 (2 rows per image), {name}, "
          f"torch {torch.__version__}" + ("; on CPU every row runs the eager step" if device.type == "cpu" else "")
          + "\n")
    header = ["weights / cache", *(f"ms/step @{n}" for n in args.batches), "linear weights",
              f"KV cache @{args.batches[-1]}", "peak memory"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in ROWS:
        if args.rows and not any(row.name.startswith(prefix) for prefix in args.rows):
            continue
        print("| " + " | ".join(measure(row, base, device, args.batches)) + " |", flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
