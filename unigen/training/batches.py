"""Picks -> tensors for the three tasks, with loss masks. Every prompt comes from the processor's
``unigen.prompts.PromptBuilder``, the one the pipeline uses, so training and inference see the same ids.

understanding: prompt (image placeholders, question) -> supervised answer + EOS (every gpt turn of a conversation,
               the chat template's turns)
generation:    prompt ending with <begin_of_image> -> supervised VQ codes (dropped caption -> the CFG prompt);
               an edit's prompt holds the source's placeholders and the instruction (unigen.generation.editing), its
               codes are the target's, and a dropped edit takes the unconditional row its pick names; with
               ``edit_source_codes`` the source's codes fill the prompt's last slots (every edit row, dropped or not)
text:          every token after BOS, plus EOS
``targets[:, t]`` is the token that position ``t`` must predict, or -100 (not supervised). A sample whose row does
not fit ``max_seq_len`` is found once at start-up (``BatchBuilder.skip_unfit``) and listed, never trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unigen.data.bad_samples import BadSamples
from unigen.data.manifest import Sample
from unigen.errors import ConfigError, DataError
from unigen.processor import understanding_pixels
from unigen.prompts import Segment, keeps_image, source_slots, with_image_tags
from unigen.training.mixture import Pick

IGNORE = -100


class SupervisionError(DataError):
    """A sample whose template leaves nothing to learn (or that cannot fit); the message names it."""


class TooLongError(SupervisionError):
    """A sample whose row does not fit ``max_seq_len``: skipped at start-up and listed, not fatal."""


def _where(s: Sample) -> str:
    """A manifest line by number; a streamed record (line 0) by its shard and key or row."""
    return f"manifest line {s.line}" if s.line or not s.source else s.source


class BatchBuilder:
    def __init__(self, model, processor, question: str, max_seq_len: int = 0):
        if model.config.vision.tiles is not None:  # its rows hold one square per image: inference would differ
            raise ConfigError("training with vision.tiles is not built yet (rows hold one square per image); remove "
                              "vision.tiles to train, and set it in the trained checkpoint's config to caption tiles")
        self.model = model  # the unwrapped model: its frozen VQ encodes images outside the training forward
        self.processor = processor
        self.question = question
        self.max_len = max_seq_len or model.config.llm.max_position_embeddings
        self.codes: dict[str, torch.Tensor] = {}  # VQ codes per image (the VQ is frozen)

    # ---- rows --------------------------------------------------------------------------
    def _row(self, segments: list[Segment], s: Sample) -> tuple[list[int], list[int]]:
        """(token ids, supervised?) segments -> inputs and next-token targets."""
        ids, sup = [], []
        for seg, supervised in segments:
            ids += seg
            sup += [supervised] * len(seg)
        if len(ids) - 1 > self.max_len:  # inputs drop the last token
            raise TooLongError(f"{_where(s)}: {len(ids) - 1} tokens do not fit max_seq_len={self.max_len}; shorten "
                               "the text or raise max_seq_len")
        targets = [ids[t + 1] if sup[t + 1] else IGNORE for t in range(len(ids) - 1)]
        if all(t == IGNORE for t in targets):
            raise SupervisionError(f"{_where(s)}: no supervised tokens within max_seq_len={self.max_len}")
        return ids[:-1], targets

    def understanding_row(self, s: Sample) -> tuple[list[int], list[int]]:
        """The chat template's turns, the image in front of the first question (as a chat message with one image
        and no tag), or a multi-image line's images in front of the turns that show them; every answer supervised."""
        turns = s.turns or [(self.question, s.caption)]
        shown = s.turn_images or [1] + [0] * (len(turns) - 1)  # a multi-image line's images go in their turns
        texts = [x for (question, answer), n in zip(turns, shown, strict=True)
                 for x in (with_image_tags(question, n), answer)]
        segments = self.processor.prompts.dialogue(texts)
        for (ids, _), (_, answer) in zip(segments[1::2], turns, strict=True):
            if len(ids) < 2:  # nothing before the EOS
                raise SupervisionError(f"{_where(s)}: the answer {answer!r} tokenizes to nothing, so the sample has "
                                       "no supervised tokens")
        return self._row(segments, s)

    def text_row(self, s: Sample) -> tuple[list[int], list[int]]:
        segments = self.processor.prompts.text(s.text)
        if not segments[1][0]:
            raise SupervisionError(f"{_where(s)}: the text {s.text!r} tokenizes to nothing")
        return self._row(segments, s)

    def generation_prompt(self, pick: Pick) -> torch.Tensor:
        """The sampler's prompt for the pick: its caption's, an edit's, or (dropped) their unconditional row."""
        prompts, s = self.processor.prompts, pick.sample
        if s.instruction is not None:
            prompt = prompts.edit(s.instruction, pick.drop if pick.dropped else None)
        else:
            prompt = prompts.generation(s.caption)
            prompt = prompts.unconditional(prompt) if pick.dropped else prompt
        n = self.model.config.vq.num_tokens
        if len(prompt) + n > self.max_len + 1:
            raise TooLongError(f"{_where(s)}: the generation prompt ({len(prompt)} tokens) and {n} image tokens do "
                               f"not fit max_seq_len={self.max_len}; shorten the text or raise max_seq_len")
        return torch.tensor(prompt)

    def skip_unfit(self, pools: dict[str, list[Sample]], bad: BadSamples) -> dict[str, list[Sample]]:
        """Every sample's rows measured once, at start-up: one that does not fit ``max_seq_len`` leaves every pool
        and joins ``bad`` with the reason (the run's bad-samples file), so no step stops on it."""
        rows = {"understanding": self.understanding_row, "text": self.text_row,
                "generation": lambda s: self.generation_prompt(Pick("generation", s, False))}
        unfit: dict[int, str] = {}
        for task, pool in pools.items():
            for s in pool:
                if id(s) in unfit:
                    continue
                try:
                    rows[task](s)
                except TooLongError as err:
                    unfit[id(s)] = f"the {task} row: {err}"
                    bad.add(s.source or f"line {s.line}", unfit[id(s)], line=s.line)
        kept = {task: [s for s in pool if id(s) not in unfit] for task, pool in pools.items()}
        if unfit and not any(kept.values()):
            raise TooLongError(f"no sample fits max_seq_len={self.max_len} (e.g. {next(iter(unfit.values()))})")
        return kept

    # ---- batches -----------------------------------------------------------------------
    def _right_pad(self, rows: list[tuple[list[int], list[int]]]) -> dict:
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.model.config.tokens.pad, dtype=torch.long)
        tgt = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, t) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            tgt[i, : len(t)] = torch.tensor(t)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "targets": tgt, "attention_mask": mask}

    def understanding(self, samples: list[Sample]) -> dict:
        batch = self._right_pad([self.understanding_row(s) for s in samples])
        batch["pixel_values"] = self._understanding_pixels([i for s in samples for i in s.understanding_images])
        return batch

    def _understanding_pixels(self, images: list) -> torch.Tensor:
        if hasattr(self.processor, "understanding_pixels"):  # it knows the checkpoint's normalisation
            return self.processor.understanding_pixels(images)
        return understanding_pixels(images, self.model.config.vision.image_size)

    def text(self, samples: list[Sample]) -> dict:
        return self._right_pad([self.text_row(s) for s in samples])

    def generation(self, picks: list[Pick]) -> dict:
        prompts = [self.generation_prompt(p).tolist() for p in picks]
        batch = self.processor.pad(prompts)  # left padding: prompts end at the same column
        batch["codes"] = self.codes_for([p.sample for p in picks])
        batch["dropped"] = torch.tensor([p.dropped for p in picks])
        # edit sources fill their rows' placeholders, in row order (a row whose image is dropped has none)
        sources = [p.sample.image for p in picks
                   if p.sample.instruction is not None and keeps_image(p.drop if p.dropped else None)]
        if sources:
            batch["pixel_values"] = self._understanding_pixels(sources)
        if source_slots(self.model.config):
            rows = [p.sample.instruction is not None for p in picks]
            if any(rows):
                batch["source_rows"] = torch.tensor(rows)
                batch["source_codes"] = self._codes_of_images([p.sample.image for p, edit in zip(picks, rows,
                                                                                                 strict=True) if edit])
        return batch

    def build(self, picks: list[Pick], fill: dict[str, Pick] | None = None) -> dict[str, dict]:
        """One micro-batch per task present. ``fill``: tasks absent here but present on another process,
        built from that pick with weight 0 (FSDP needs every process to run the same modules)."""
        out = {}
        by_task: dict[str, list[Pick]] = {}
        for p in picks:
            by_task.setdefault(p.task, []).append(p)
        for task, chosen in list(by_task.items()) + [(t, [p]) for t, p in (fill or {}).items() if t not in by_task]:
            if task == "generation":
                b = self.generation(chosen)
                n = b["codes"].numel()
            else:
                b = (self.understanding if task == "understanding" else self.text)([p.sample for p in chosen])
                n = int((b["targets"] != IGNORE).sum())
            real = task in by_task
            b["weight"] = 1.0 if real else 0.0
            b["tokens"] = n if real else 0
            out[task] = b
        return out

    # ---- VQ codes ----------------------------------------------------------------------
    @torch.no_grad()
    def codes_for(self, samples: list[Sample]) -> torch.Tensor:
        given = [self._given_codes(s) if s.codes is not None else None for s in samples]
        encoded = iter(self._codes_of_images([s.vq_image for s in samples if s.codes is None]))
        return torch.stack([codes if codes is not None else next(encoded) for codes in given]).long()

    @torch.no_grad()
    def _codes_of_images(self, paths: list) -> torch.Tensor:
        """Image files -> their VQ codes (len(paths), n), each file encoded once per run."""
        missing = list(dict.fromkeys(str(p) for p in paths if str(p) not in self.codes))
        if missing:
            pixels = self.processor.generation_pixels(missing).to(self.model.device, self.model.dtype)
            for path, codes in zip(missing, self.model.encode_image_tokens(pixels).cpu(), strict=True):
                self.codes[path] = codes.to(torch.int32)  # a quarter of int64's memory for a large dataset
        return torch.stack([self.codes[str(p)] for p in paths]).long() if paths else torch.zeros(0, dtype=torch.long)

    def _given_codes(self, s: Sample) -> torch.Tensor:
        key = f"codes:{s.line}"
        if key not in self.codes:
            codes = s.codes
            if isinstance(codes, Path):
                if not codes.is_file():
                    raise SupervisionError(f"{_where(s)}: codes file {codes} does not exist")
                if codes.suffix == ".npy":
                    import numpy as np

                    codes = np.load(codes)
                codes = torch.load(codes, weights_only=True) if isinstance(codes, Path) else codes
            codes = torch.as_tensor(codes, dtype=torch.long).flatten()
            vq = self.model.config.vq
            if codes.numel() != vq.num_tokens:
                raise SupervisionError(f"{_where(s)}: {codes.numel()} pre-extracted codes; the VQ makes "
                                       f"{vq.num_tokens}")
            if int(codes.min()) < 0 or int(codes.max()) >= vq.codebook_size:
                raise SupervisionError(f"{_where(s)}: pre-extracted codes must lie in [0, {vq.codebook_size}); got "
                                       f"[{int(codes.min())}, {int(codes.max())}]")
            self.codes[key] = codes.to(torch.int32)
        return self.codes[key]
