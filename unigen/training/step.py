"""The training forward: one micro-batch of every task -> summed token cross-entropy per task.

DDP, FSDP and DeepSpeed hook a module's ``forward``; wrapping this module (not the model) lets them see the
whole computation, including the model methods that are not ``forward`` (``image_logits``, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unigen.models.moe import moe_layers, router_losses
from unigen.training.batches import IGNORE
from unigen.training.recipe import TASKS


class TrainStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.moe = bool(moe_layers(model))

    def forward(self, batch: dict[str, dict]) -> torch.Tensor:
        """(3,) summed losses in ``TASKS`` order (0 for an absent task); each task's weight applied."""
        device = self.model.device
        out = []
        for task in TASKS:
            b = batch.get(task)
            if b is None:
                out.append(torch.zeros((), device=device))
                continue
            b = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            loss = getattr(self, task)(b)
            if self.moe:  # the routers' balance and z losses, per supervised token like the task's own
                loss = loss + router_losses(self.model, b["attention_mask"], _supervised_per_row(b))
            out.append(loss * b["weight"])
        return torch.stack(out)

    def _text_head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # the text head only where a token is supervised: (B, L, vocab) logits would dominate memory
        keep = targets != IGNORE
        logits = self.model.language_model.lm_head(hidden[keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")

    def understanding(self, b: dict) -> torch.Tensor:
        m = self.model
        if m.cross_attn_layers is not None:  # Method B: images go through the cross-attention blocks
            out = m(b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"])
            hidden = out.last_hidden_state
        else:
            embeds = m.prepare_inputs_embeds(b["input_ids"], b["pixel_values"])
            hidden = m.run_decoder(embeds, b["attention_mask"]).last_hidden_state
        return self._text_head_loss(hidden, b["targets"])

    def text(self, b: dict) -> torch.Tensor:
        hidden = self.model.run_decoder(self.model.embed_text(b["input_ids"]), b["attention_mask"]).last_hidden_state
        return self._text_head_loss(hidden, b["targets"])

    def generation(self, b: dict) -> torch.Tensor:
        # edit rows carry pixel_values: their source images fill the prompts' placeholders
        logits = self.model.image_logits(b["input_ids"], b["codes"], b["attention_mask"], b.get("pixel_values"),
                                         b.get("source_codes"), b.get("source_rows"))
        return F.cross_entropy(logits.flatten(0, 1).float(), b["codes"].flatten(), reduction="sum")


def _supervised_per_row(b: dict) -> torch.Tensor:
    if "targets" in b:
        return (b["targets"] != IGNORE).sum(1).float()
    codes = b["codes"]
    return torch.full((codes.shape[0],), float(codes.shape[1]), device=codes.device)
