"""Samples -> tensors for the three tasks, with loss masks.

understanding: prompt (image placeholders, question) -> supervised answer + EOS
generation:    prompt ending with <begin_of_image> -> supervised VQ codes (caption dropout -> CFG prompt)
text:          every token after BOS, plus EOS
``targets[:, t]`` is the token that position ``t`` must predict, or -100.
"""

from __future__ import annotations

import torch

from unigen.sampling import unconditional_rows
from unigen.train.data import Sample

IGNORE = -100


class SupervisionError(ValueError):
    """A sample whose template leaves nothing to learn."""


class BatchBuilder:
    def __init__(self, model, processor, question: str, caption_dropout: float):
        self.model = model
        self.processor = processor
        self.question = question
        self.caption_dropout = caption_dropout
        self.codes: dict[str, torch.Tensor] = {}  # VQ codes per image (the VQ is frozen)

    def _answer_ids(self, text: str, sample: Sample) -> list[int]:
        ids = self.processor.tokenizer(" " + text.strip(), add_special_tokens=False).input_ids
        if not ids:
            raise SupervisionError(f"manifest line {sample.line}: the answer {text!r} tokenizes to nothing, "
                                   "so the sample has no supervised tokens")
        return ids + [self.model.config.tokens.eos]

    def _right_pad(self, rows: list[list[int]], targets: list[list[int]]):
        width = max(len(r) for r in rows)
        pad = self.model.config.tokens.pad
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        tgt = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            tgt[i, : len(t)] = torch.tensor(t)
            mask[i, : len(r)] = 1
        return ids, tgt, mask

    def understanding(self, samples: list[Sample]) -> dict:
        p = self.processor
        rows, targets = [], []
        for s in samples:
            prompt = p._expand_images(p.encode(p.understanding_prompt(s.question or self.question)))
            answer = self._answer_ids(s.answer if s.answer is not None else s.caption, s)
            rows.append(prompt + answer[:-1])
            # position t predicts token t + 1: the last prompt position predicts the first answer token
            targets.append([IGNORE] * (len(prompt) - 1) + answer)
        ids, tgt, mask = self._right_pad(rows, targets)
        pixels = p.understanding_inputs([s.image for s in samples], [""] * len(samples))["pixel_values"]
        return {"input_ids": ids, "targets": tgt, "attention_mask": mask, "pixel_values": pixels}

    def text(self, samples: list[Sample]) -> dict:
        rows, targets = [], []
        eos = self.model.config.tokens.eos
        for s in samples:
            ids = self.processor.encode(s.text)
            if len(ids) < 2:
                raise SupervisionError(f"manifest line {s.line}: text {s.text!r} tokenizes to nothing")
            rows.append(ids)
            targets.append(ids[1:] + [eos])
        ids, tgt, mask = self._right_pad(rows, targets)
        return {"input_ids": ids, "targets": tgt, "attention_mask": mask}

    def generation(self, samples: list[Sample], drop: torch.Tensor) -> dict:
        """``drop[i]``: train sample i on the unconditional (CFG) prompt (caption dropout, drawn by the caller)."""
        tokens = self.model.config.tokens
        prompts = [torch.tensor(self.processor.encode(self.processor.format.generation(s.caption))) for s in samples]
        prompts = [u if d else c for c, u, d in zip(prompts, unconditional_rows(prompts, tokens), drop, strict=True)]
        batch = self.processor.pad([p.tolist() for p in prompts])  # left padding: prompts end at the same column
        batch["codes"] = torch.stack([self._codes(s) for s in samples])
        batch["dropped"] = drop
        return batch

    @torch.no_grad()
    def _codes(self, s: Sample) -> torch.Tensor:
        if s.codes is not None:
            codes = torch.tensor(s.codes, dtype=torch.long)
            if codes.numel() != self.model.config.vq.num_tokens:
                raise SupervisionError(f"manifest line {s.line}: {codes.numel()} pre-extracted codes, the VQ makes "
                                       f"{self.model.config.vq.num_tokens}")
            return codes
        key = str(s.image)
        if key not in self.codes:
            pixels = self.processor.generation_pixels([s.image]).to(self.model.device, self.model.dtype)
            self.codes[key] = self.model.encode_image_tokens(pixels)[0].cpu()
        return self.codes[key]
