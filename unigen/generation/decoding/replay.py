"""The fixed-shape decode step, captured once and replayed: a CUDA graph on CUDA, ``torch.compile`` on CPU.

A decode step of a small batch is bound by kernel launches on a GPU (hundreds of small kernels per token),
so replaying a captured graph removes most of its time. The step writes the cache in place at
``cache.column`` (a device tensor) and reads positions from ``cache.next_pos``, so one capture serves
every token of an image.
"""

from __future__ import annotations

import torch


def decode_step_for(decoder, cache, compile: bool | None):
    """The step to call as ``step(x, cache)``. ``compile``: ``None`` picks what is faster where it runs (a
    CUDA graph on CUDA, the eager step on CPU, where compiling costs more than one image saves); ``True``
    captures (CUDA graph on CUDA, ``torch.compile`` on CPU); ``False`` is always eager."""
    if compile is False or (compile is None and cache.k.device.type != "cuda"):
        return decoder.decode_step
    if cache.k.device.type == "cuda":
        return CapturedStep(decoder, cache)
    return torch.compile(decoder.decode_step)


class CapturedStep:
    """``decoder.decode_step`` for one cache as a CUDA graph: inputs are copied into a static buffer, the
    graph is replayed, and the static output is returned (valid until the next call)."""

    def __init__(self, decoder, cache, warmup: int = 2):
        self.cache = cache
        width = decoder.config.hidden_size
        self.x = torch.zeros(cache.batch_size, 1, width, dtype=decoder.embed_tokens.weight.dtype,
                             device=cache.k.device)
        # Warm-up runs execute the step (cuBLAS handles, the allocator's pools), which moves the cache on by
        # a column; the bookkeeping is put back so that the captured graph starts where the sampler is.
        saved = cache.column.clone(), cache.next_pos.clone(), cache.key_bias.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                decoder.decode_step(self.x, cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.column.copy_(saved[0])
        cache.next_pos.copy_(saved[1])
        cache.key_bias.copy_(saved[2])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = decoder.decode_step(self.x, cache)

    def __call__(self, x: torch.Tensor, cache) -> torch.Tensor:
        if cache is not self.cache:
            raise ValueError("a captured decode step replays on the cache it was captured with")
        self.x.copy_(x)
        self.graph.replay()
        return self.out
