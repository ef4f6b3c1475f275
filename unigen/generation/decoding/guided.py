"""A guided image batch: a conditional and an unconditional row per image in one static cache.

Every decoder reads and writes the cache through this class, which also counts decoder passes (the
prefill included) and turns hidden states into the guided distribution of each image token:
``probs(u + s * (c - u))`` with the CFG scale ``s`` of that token's index in the image.
"""

from __future__ import annotations

import torch

from unigen.generation.decoding.draw import Generators, draw, token_probs, uniforms


class GuidedRows:
    def __init__(self, model, n_images: int, scales: list[float], temperature: float, top_k: int | None,
                 top_p: float | None, generator: Generators):
        self.model, self.n = model, n_images
        self.scales = torch.tensor(scales, dtype=torch.float32, device=model.device)
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.cache = None
        self.passes = 0  # batched decoder forward calls, the prefill included

    @property
    def n_tokens(self) -> int:
        return self.scales.shape[0]

    @property
    def decoder(self):
        return self.model.decoder

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, pixel_values: torch.Tensor | None,
                room: int, source_codes: torch.Tensor | None = None) -> torch.Tensor:
        """The prompts (conditional rows, then unconditional; ``source_codes`` in their last slots, one row of
        codes per row) -> the last hidden state of each row, with ``room`` free cache columns after them."""
        self.cache = self.decoder.new_cache(ids.shape[0], ids.shape[1] + room)
        out = self.model(ids, pixel_values=pixel_values, attention_mask=mask, past_key_values=self.cache,
                         logits_to_keep=1, source_codes=source_codes)
        self.passes += 1
        return out.last_hidden_state[:, -1]

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(images, k) codes -> (2 * images, k, width): the same tokens enter both rows of an image."""
        return self.model.embed_image_tokens(codes.repeat(2, 1))

    def logits(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """hidden (2 * images, k, width) and each token's index in the image (k,) or (images, k) ->
        guided logits (images, k, codebook), float32."""
        out = self.model.gen_head(hidden).float()
        c, u = out[: self.n], out[self.n :]
        return u + self.scales[index][..., None] * (c - u)

    def probs(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return token_probs(self.logits(hidden, index), self.temperature, self.top_k, self.top_p)

    def uniforms(self, k: int) -> torch.Tensor:
        """(images, k) uniforms from each image's stream; greedy distributions are one-hot, so a zero draws
        their token and no random number is spent."""
        if self.temperature == 0:
            return torch.zeros(self.n, k, device=self.model.device)
        return uniforms(self.generator, self.n, k, self.model.device)

    def sample(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """hidden (2 * images, k, width) -> tokens (images, k) drawn from the guided distributions."""
        return draw(self.probs(hidden, index), self.uniforms(index.shape[-1]))

    def extend(self, codes: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """One pass over ``k`` new tokens per image at explicit rotary ``positions`` (2 * images, k) and column
        ``visible``ity (2 * images, k, written + k) -> hidden states (2 * images, k, width)."""
        self.passes += 1
        return self.decoder.extend(self.embed(codes), self.cache, positions, visible)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """One causal pass over ``k`` new tokens per image at the next positions -> (2 * images, k, width)."""
        self.passes += 1
        return self.decoder(self.embed(codes), cache=self.cache)
