"""Method A (concat) vs Method B (cross-attention) on the SAME backbone: prefill time, peak memory, decode time.

For each image-token count (576 per 384px image: 1, 2, 4, 8 images) both models get the same prompt
text; Method A holds every image feature in the sequence, Method B one placeholder per image and the
features in its cross-attention blocks. Timed: the prefill (image encoding + decoder, ``use_cache=True``)
and single-token decode steps after it. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the
weights; on CPU the peak of live tensor bytes the prefill allocates (tracked per op with a dispatch mode;
kernel-internal scratch is not seen). Cache: bytes held by the KV cache (+ image K/V for Method B).

The understanding encoder is the patch encoder (a single Linear), identical in both models, so the
numbers are the decoder's. Default sizes are a SMALL backbone that runs on one CPU thread in a few
minutes; ``--preset 1b`` is Janus-Pro-1B's LLM shape (for a GPU).

    .venv/bin/python benchmarks/bench_fusion.py --threads 1
    python3 benchmarks/bench_fusion.py --device cuda --dtype bfloat16 --preset 1b
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unigen import UniGenModel  # noqa: E402
from unigen.config import LLMConfig, SigLIPConfig, TokenIds, UniGenConfig, VQConfig  # noqa: E402
from unigen.models.cross_attention import add_cross_attention  # noqa: E402

PRESETS = {
    "small": dict(hidden_size=256, intermediate_size=688, num_layers=8, num_heads=8, num_kv_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16, num_kv_heads=16),
}
TOKENS = TokenIds(bos=1, eos=2, pad=0, cfg_pad=3, image_start=4, image_end=5, image=6)


def build_models(preset: str, every: int, device: str, dtype: torch.dtype, vocab: int):
    llm = LLMConfig(vocab_size=vocab, max_position_embeddings=8192, **PRESETS[preset])
    cfg = UniGenConfig(
        vision=SigLIPConfig(image_size=384, patch_size=16, width=llm.hidden_size),  # 576 tokens per image
        vq=VQConfig(codebook_size=64, base_channels=32, channel_mult=(1, 1), num_res_blocks=1, z_channels=32,
                    image_size=32),  # unused here; kept tiny
        llm=llm, tokens=TOKENS, gen_head_dim=64, encoder="patch", cross_attention_every=every,
    )
    torch.manual_seed(0)
    a = UniGenModel(cfg).to(device=device, dtype=dtype).eval()
    b = add_cross_attention(copy.deepcopy(a))
    with torch.no_grad():
        for name, p in b.cross_attn_layers.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)  # open gates: the blocks really contribute (cost does not depend on it)
    return a, b.eval()


def prompt(n_images: int, method: str, text: int) -> torch.Tensor:
    words = list(range(10, 10 + text))
    image = [TOKENS.image_start] + [TOKENS.image] * (576 if method == "A" else 1) + [TOKENS.image_end]
    return torch.tensor([[TOKENS.bos] + words[: text // 2] + image * n_images + words[text // 2 :]])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive (CPU peak-memory stand-in).

    ``existing`` tensors (weights, inputs) are never counted, also not through views made of them.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: set[int] = set()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}

    def _release(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen and key not in self.existing:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def cache_bytes(cache) -> int:
    """Bytes of the decoder's KV cache plus Method B's image keys/values riding on it."""
    total = cache.k.numel() * cache.k.element_size() * 2
    state = cache.cross_attention_state
    if state is not None:
        for t in [*state.keys.values(), *state.values.values()]:
            total += t.numel() * t.element_size()
    return total


def measure(model, ids, pixels, device: str, repeats: int, decode_steps: int, batch: int = 1) -> dict:
    ids = ids.repeat(batch, 1).to(device)
    pixels = pixels.repeat(batch, 1, 1, 1).to(device=device, dtype=model.dtype)
    with torch.no_grad():
        model(ids, pixel_values=pixels, use_cache=True)  # warm-up
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            out = model(ids, pixel_values=pixels, use_cache=True)
            sync(device)
            times.append(time.perf_counter() - t0)
        del out
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = model(ids, pixel_values=pixels, use_cache=True)
            sync(device)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            tracker = LiveTensorBytes([*model.parameters(), *model.buffers(), ids, pixels])
            with tracker:
                out = model(ids, pixel_values=pixels, use_cache=True)
            peak = tracker.peak
        prefilled = out.past_key_values
        kv = cache_bytes(prefilled)
        del out

        def decode() -> list[float]:
            """``decode_steps`` single-token steps from a copy of the prefilled cache; seconds per step."""
            cache = copy.deepcopy(prefilled)
            step = torch.full((batch, 1), 20, device=device)
            steps = []
            for i in range(decode_steps):
                sync(device)
                t0 = time.perf_counter()
                out = model(step, position_ids=torch.full((batch, 1), ids.shape[1] + i, device=device),
                            past_key_values=cache, use_cache=True)
                sync(device)
                steps.append(time.perf_counter() - t0)
                cache = out.past_key_values
            return steps

        decode()  # warm-up over the same shapes (cuDNN attention builds a plan per new KV length)
        result = {"prefill_s": statistics.median(times), "peak_mib": peak / 2**20, "cache_mib": kv / 2**20,
                  "decode_ms": 1e3 * statistics.median(decode()), "seq": ids.shape[1]}
        if device == "cuda":  # GPU kernel time per step (batch-1 decode is bound by kernel launches)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                decode()
            events = prof.key_averages()
            us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
            result["decode_gpu_ms"] = us / 1e3 / decode_steps
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--every", type=int, default=4, help="cross_attention_every for Method B")
    p.add_argument("--image-tokens", default="576,1152,2304,4608")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="rows per prefill/decode (the same prompt repeated)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    a, b = build_models(args.preset, args.every, args.device, dtype, args.vocab)
    llm = a.config.llm
    where = f"{args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    print(f"backbone: preset {args.preset}, width {llm.hidden_size}, {llm.num_layers} blocks, {llm.num_heads} heads "
          f"({llm.num_kv_heads} kv), {sum(p.numel() for p in a.language_model.parameters()) / 1e6:.1f}M LLM params; "
          f"Method B adds {len(b.cross_attn_layers)} cross-attention blocks at {sorted(map(int, b.cross_attn_layers))} "
          f"(+{sum(p.numel() for p in b.cross_attn_layers.parameters()) / 1e6:.1f}M params)")
    print(f"device {where}, dtype {args.dtype}, torch.set_num_threads({args.threads}), torch {torch.__version__}; "
          f"batch {args.batch}, {args.text_tokens} text tokens, prefill median of {args.repeats}, "
          f"decode median of {args.decode_steps} steps"
          + ("; SMALL backbone so that it runs on CPU in a few minutes" if args.preset == "small" else ""))
    mem = "peak MiB (CUDA max_memory_allocated)" if args.device == "cuda" else "peak MiB (live tensors)"
    head = (f"{'img tok':>7} | {'seq A':>5} {'seq B':>5} | {'prefill A s':>11} {'prefill B s':>11} {'A/B':>6} | "
            f"{'peak A':>8} {'peak B':>8} {'A/B':>6} | {'cache A':>8} {'cache B':>8} | "
            f"{'decode A ms':>11} {'decode B ms':>11} {'A/B':>5}"
            + (f" | {'dec GPU A':>9} {'dec GPU B':>9} {'A/B':>5}" if args.device == "cuda" else ""))
    print(f"memory: {mem}; cache: KV cache MiB after prefill (Method B: + image K/V); decode: wall ms per "
          "token (median, after a warm-up pass over the same shapes)"
          + ("; dec GPU: CUDA kernel ms per token (profiler)" if args.device == "cuda" else ""))
    print(head)
    print("-" * len(head))
    for n_tok in [int(x) for x in args.image_tokens.split(",")]:
        if n_tok % 576:
            raise SystemExit(f"--image-tokens must be multiples of 576 (one 384px image); got {n_tok}")
        n_img = n_tok // 576
        px = torch.rand(n_img, 3, 384, 384, generator=torch.Generator().manual_seed(n_img)) * 2 - 1
        ra = measure(a, prompt(n_img, "A", args.text_tokens), px, args.device, args.repeats, args.decode_steps,
                     args.batch)
        rb = measure(b, prompt(n_img, "B", args.text_tokens), px, args.device, args.repeats, args.decode_steps,
                     args.batch)
        print(f"{n_tok:>7} | {ra['seq']:>5} {rb['seq']:>5} | {ra['prefill_s']:>11.4f} {rb['prefill_s']:>11.4f} "
              f"{ra['prefill_s'] / rb['prefill_s']:>6.2f} | {ra['peak_mib']:>8.1f} {rb['peak_mib']:>8.1f} "
              f"{ra['peak_mib'] / rb['peak_mib']:>6.2f} | {ra['cache_mib']:>8.1f} {rb['cache_mib']:>8.1f} | "
              f"{ra['decode_ms']:>11.2f} {rb['decode_ms']:>11.2f} {ra['decode_ms'] / rb['decode_ms']:>5.2f}"
              + (f" | {ra['decode_gpu_ms']:>9.3f} {rb['decode_gpu_ms']:>9.3f} "
                 f"{ra['decode_gpu_ms'] / rb['decode_gpu_ms']:>5.2f}" if args.device == "cuda" else ""),
              flush=True)


if __name__ == "__main__":
    main()
