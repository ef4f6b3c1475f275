"""Sampling speed, measured in one run. Three sections (``--sections``, default all):

- ``transformers``: unigen vs transformers' Janus on the same random weights. CPU: a small Janus (width 512,
  8 layers, 576 image tokens, 16384 codes) at 1 and 16 images, plus captioning tokens/s, both in float32
  (``--dtype bfloat16``: both in bf16).
- ``decoding``: each image decoder (``--methods``) on the same model: decoder passes, ms per image and
  images/s at 1 and 16 images, against sequential decoding.
- ``shapes``: the shipped Shapes checkpoint with its default guidance and temperature: ShapesEval prompt
  fidelity of each decoder on the same prompts and seeds (``--shapes-prompts``, default 200), its passes and
  its wall time at 1 image, so speed and quality are read side by side.

In the ``transformers`` section each unigen row is followed by the bytes a decode step reads (weights and the
KV cache's average filled part) over its time (the prefill's share included), against the machine's read
bandwidth measured in the same run (``sum`` over 512 MiB): the fraction of the memory bound, as a number.
``--quantize METHOD`` and ``--kv-cache-dtype DTYPE`` apply to unigen's model (docs/QUANTIZATION.md).

``--gpu``: the Janus-Pro-1B shape in bf16 on CUDA: seconds per image for each decoder and the fraction of
the memory-bandwidth bound of one pass per token (weights read once per pass).

    python benchmarks/bench_sampling.py --threads 2
    python benchmarks/bench_sampling.py --threads 2 --sections decoding shapes
    python benchmarks/bench_sampling.py --gpu --sections transformers decoding
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from unigen import UniGenModel
from unigen.generation.sampling import generate_image_tokens, generate_text
from unigen.generation.sampling_options import SamplingOptions
from unigen.models.quantize import tensor_bytes
from unigen.testing import TINY_TOKENS as T
from unigen.testing import make_tiny_hf_janus


def timed(fn, device) -> float:
    return timed_call(fn, device)[0]


def timed_call(fn, device):
    """(seconds, fn's result)"""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def decode_bytes(model) -> int:
    """Bytes one image-token step must read at least: every decoder block, the final norm, gen_aligner
    and gen_head (embed_tokens and lm_head are not used in image decoding; the KV cache is left out).
    A quantized weight counts its stored bytes (data and scales)."""
    modules = [*model.language_model.model.layers, model.language_model.model.norm, model.gen_aligner,
               model.gen_head]
    return sum(tensor_bytes(p) for m in modules for p in m.parameters())


def cache_bytes_per_step(model, rows: int, prompt_len: int, n_tok: int) -> int:
    """Keys and values an eager decode step reads on average over an image (it reads the filled columns)."""
    cfg = model.decoder.config
    cache = model.decoder.new_cache(1, 1)
    columns = prompt_len + n_tok / 2
    return int(2 * cfg.num_layers * rows * cfg.num_kv_heads * columns * cfg.head_width * cache.k.itemsize)


def read_bandwidth(device) -> float:
    """The machine's read bandwidth in bytes/s, measured now: the best of 5 ``sum`` calls over 512 MiB (far
    beyond the caches), on as many threads as the benchmark uses."""
    data = torch.ones(128 * 2**20, device=device)
    best = min(timed(lambda: data.sum(), device) for _ in range(5))
    return data.nbytes / best


def bound_line(model, images: int, n_tok: int, seconds: float, bandwidth: float) -> str:
    """Bytes read per decode step (weights + the cache's average) over the step's time, against ``bandwidth``."""
    step = seconds / n_tok
    read = decode_bytes(model) + cache_bytes_per_step(model, 2 * images, prompt_ids("cpu").shape[1], n_tok)
    return (f"{'':>6} {'':>14} reads {read / 2**20:.0f} MiB/step in {1000 * step:.2f} ms = {read / step / 1e9:.1f} "
            f"GB/s, {read / step / bandwidth:.0%} of the {bandwidth / 1e9:.1f} GB/s measured read bandwidth")


def peak_bandwidth() -> float:
    """Nominal HBM bandwidth of the GPU in bytes/s (H100 SXM 3.35 TB/s, H100 PCIe 2.0, H200 4.8, A100 2.0)."""
    name = torch.cuda.get_device_name()
    if "H200" in name:
        return 4.8e12
    if "H100" in name:
        return 2.0e12 if "PCIe" in name else 3.35e12
    if "A100" in name:
        return 2.0e12
    return 3.35e12


def build(args, directory):
    if args.gpu:  # Janus-Pro-1B: 2048 wide, 24 layers, 16 heads, 5632 MLP
        kw = dict(vocab_size=102400, width=2048, layers=24, image_size=384, patch=16, vq_mult=(1, 1, 2, 2, 4),
                  codebook=16384, max_positions=4096)
    else:
        kw = dict(vocab_size=32000, width=args.width, layers=args.layers, image_size=384, patch=16,
                  vq_mult=(1, 1, 2, 2, 4), codebook=16384, max_positions=4096)
    return make_tiny_hf_janus(directory, seed=0, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="images per run (default 1 16)")
    p.add_argument("--tokens", type=int, default=None, help="time only the first N image tokens of each image")
    p.add_argument("--text-tokens", type=int, default=64, help="new tokens in the captioning benchmark")
    p.add_argument("--gpu", action="store_true", help="Janus-Pro-1B shape, bf16, on CUDA")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and activations of both models (default: float32 on CPU, bfloat16 with --gpu)")
    p.add_argument("--compile", action="store_true", help="also time unigen with a compiled decode step")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per implementation, best kept (default 2)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--methods", nargs="+", default=["sequential", "jacobi:16", "zipar"],
                   help="decoders to compare, NAME or NAME:WINDOW (default: sequential jacobi:16 zipar)")
    p.add_argument("--shapes-prompts", type=int, default=200, help="prompts of the fidelity comparison (default 200)")
    p.add_argument("--quantize", default=None, help="quantize unigen's model (unigen.models.quantize.METHODS)")
    p.add_argument("--kv-cache-dtype", default=None, help="unigen's KV cache dtype, e.g. bfloat16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.gpu else "float32"))

    with tempfile.TemporaryDirectory() as directory:
        hf = build(args, directory).to(device, dtype).eval()
        ours = UniGenModel.from_pretrained(directory, dtype=dtype).to(device)
    if args.quantize:
        ours.quantize(args.quantize)
    if args.kv_cache_dtype:
        ours.decoder.kv_cache_dtype = getattr(torch, args.kv_cache_dtype)
    n_tok = ours.config.vq.num_tokens
    if args.tokens:  # shorter runs on a busy machine: shrink the image-token count of both models
        n_tok = args.tokens
        hf.model.vision_model.config.num_image_tokens = n_tok
        ours.config.vq.image_size = int(n_tok**0.5) * ours.config.vq.downsample
    print(f"device {device}, dtype {dtype}, threads {torch.get_num_threads()}, width "
          f"{ours.config.llm.hidden_size}, layers {ours.config.llm.num_layers}, image tokens {n_tok}, "
          f"codebook {ours.config.vq.codebook_size}")

    methods = [parse_method(m) for m in args.methods]
    if "transformers" in args.sections:
        compare_with_transformers(args, hf, ours, device, n_tok)
    if "decoding" in args.sections:
        compare_decoders(args, ours, device, n_tok, methods)
    if "shapes" in args.sections and not args.gpu:
        compare_on_shapes(args, methods)
    if hasattr(os, "getloadavg"):
        print(f"load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
              f"(above ~0 means other processes shared the cores)")


SECTIONS = ("transformers", "decoding", "shapes")
GUIDED = SamplingOptions(guidance_scale=5.0)  # transformers' default guidance, the comparison's


def parse_method(text: str) -> tuple[str, dict]:
    name, _, window = text.partition(":")
    return name, ({"window": int(window)} if window else {})


def method_label(name: str, options: dict) -> str:
    return name + (f":{options['window']}" if options else "")


def prompt_ids(device) -> torch.Tensor:
    return torch.tensor([[T.bos] + [20 + i for i in range(12)] + [T.image_start]], device=device)


def compare_decoders(args, ours, device, n_tok: int, methods) -> None:
    """Passes and wall time of each decoder on the same model and prompt (sampled at temperature 1)."""
    print(f"\n{'images':>6} {'decoding':>12} {'passes':>7} {'ms/image':>9} {'images/s':>9} {'vs seq':>7}   "
          f"(best of {args.repeats})")
    for n in args.batches:
        ids = prompt_ids(device).repeat(n, 1)
        runs = {method_label(name, opts): (lambda name=name, opts=opts, ids=ids: generate_image_tokens(
            ours, ids, options=SamplingOptions(guidance_scale=5.0, decoding=name, decoding_options=opts),
            generator=torch.Generator(device).manual_seed(0))) for name, opts in methods}
        best, passes = dict.fromkeys(runs, float("inf")), {}
        with torch.no_grad():
            if args.gpu:
                for fn in runs.values():
                    fn()  # warm-up (CUDA-graph capture, allocator)
            for _ in range(args.repeats):
                for label, fn in runs.items():
                    seconds, result = timed_call(fn, device)
                    best[label], passes[label] = min(best[label], seconds), result.decoder_passes
        base = best.get("sequential")
        for label, seconds in best.items():
            ratio = f"{base / seconds:>6.2f}x" if base else "     -"
            print(f"{n:>6} {label:>12} {passes[label]:>7} {1000 * seconds / n:>9.1f} {n / seconds:>9.3f} {ratio}")
            if args.gpu and n == 1:
                bound = n_tok * decode_bytes(ours) / peak_bandwidth()
                print(f"{'':>6} {'':>12} {seconds:.3f} s/image; one pass per token is bound by {bound:.3f} s "
                      f"-> {bound / seconds:.0%} of that bound")


def compare_on_shapes(args, methods) -> None:
    """The shipped checkpoint: fidelity, passes and 1-image wall time of each decoder, same prompts and seeds."""
    from unigen.errors import ArgumentError
    from unigen.generation.pipeline import UniGenPipeline
    from unigen.recipes import recipe_path
    from unigen.shapes.evaluate import evaluate_generation

    pipe = UniGenPipeline.from_pretrained(recipe_path("checkpoints/shapes-small"))
    cfg = pipe.model.config
    print(f"\nshipped checkpoints/shapes-small: {cfg.vq.num_tokens} image tokens, guidance {cfg.guidance_scale}, "
          f"temperature {cfg.temperature}, {args.shapes_prompts} prompts")
    print(f"{'decoding':>12} {'fidelity':>9} {'passes@1':>9} {'vs seq':>7} {'ms/image@1':>11} {'vs seq':>7}")
    base = None
    for name, opts in methods:
        label = method_label(name, opts)
        try:
            options = SamplingOptions(decoding=name, decoding_options=opts)
            scores, _ = evaluate_generation(pipe, n=args.shapes_prompts, options=options)
        except ArgumentError as err:  # e.g. a ZipAR window wider than this checkpoint's 8-token rows
            print(f"{label:>12} skipped: {err}")
            continue
        best = float("inf")
        for seed in range(max(3, args.repeats)):
            seconds, out = timed_call(lambda options=options, seed=seed: pipe(
                "a large red circle at the top left", options=options, generator=torch.Generator().manual_seed(seed)),
                torch.device("cpu"))
            best = min(best, seconds)
        if name == "sequential":
            base = (out.decoder_passes, best)
        p_ratio = f"{out.decoder_passes / base[0]:>6.2f}x" if base else "     -"
        t_ratio = f"{base[1] / best:>6.2f}x" if base else "     -"
        print(f"{label:>12} {scores['overall']:>9.3f} {out.decoder_passes:>9} {p_ratio} {1000 * best:>11.1f} {t_ratio}",
              flush=True)


def compare_with_transformers(args, hf, ours, device, n_tok: int) -> None:
    prompt = prompt_ids(device)
    bandwidth = read_bandwidth(device)
    print(f"{'images':>6} {'impl':>14} {'ms/token':>9} {'images/s':>9} {'speedup':>8}   (best of {args.repeats})")
    for n in args.batches:
        ids = prompt.repeat(n, 1)
        mask = torch.ones_like(ids)
        runs = {
            "transformers": lambda ids=ids, mask=mask: hf.generate(
                ids, attention_mask=mask, generation_mode="image", do_sample=True, top_k=0, guidance_scale=5.0),
            "unigen": lambda ids=ids, mask=mask: generate_image_tokens(ours, ids, mask, options=GUIDED),
        }
        if args.compile:
            runs["unigen+compile"] = lambda ids=ids, mask=mask: generate_image_tokens(
                ours, ids, mask, options=GUIDED, compile=True)
        best = dict.fromkeys(runs, float("inf"))
        with torch.no_grad():
            if args.gpu or args.compile:
                for name, fn in runs.items():
                    if name != "transformers" or args.gpu:
                        fn()  # warm-up (compilation, allocator)
            # interleaved repeats, best time each: on a shared machine a neighbour's burst then hits
            # one repeat of one implementation instead of all of it
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    best[name] = min(best[name], timed(fn, device))
        base = best["transformers"]
        for name, seconds in best.items():
            print(f"{n:>6} {name:>14} {1000 * seconds / n_tok:>9.2f} {n / seconds:>9.3f} {base / seconds:>7.2f}x")
            if name == "unigen":
                print(bound_line(ours, n, n_tok, seconds, bandwidth))
            if args.gpu and name != "transformers" and n == 1:
                bound = n_tok * decode_bytes(ours) / peak_bandwidth()
                print(f"{'':>6} {'':>14} bound {bound:.3f} s/image -> {bound / seconds:.0%} of bandwidth bound")

    # captioning: text generation speed after a prompt with one image
    pixels = torch.rand(1, 3, 384, 384, device=device, dtype=ours.dtype) * 2 - 1
    img = [T.image_start] + [T.image] * ours.config.vision.num_tokens + [T.image_end]
    ids = torch.tensor([[T.bos, 20, 21] + img + [22, 23]], device=device)
    hf.generation_config.eos_token_id = None  # both run the full length
    k = args.text_tokens
    with torch.no_grad():
        t_hf = t_us = float("inf")
        for _ in range(args.repeats):
            t_hf = min(t_hf, timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                                       max_new_tokens=k, do_sample=False), device))
            t_us = min(t_us, timed(lambda: generate_text(ours, ids, pixel_values=pixels, max_new_tokens=k,
                                                         eos_token_id=-1), device))
    print(f"captioning {k} tokens: transformers {k / t_hf:.1f} tok/s, unigen {k / t_us:.1f} tok/s, "
          f"speedup {t_hf / t_us:.2f}x (best of {args.repeats})")


if __name__ == "__main__":
    main()
