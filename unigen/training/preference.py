"""Preference losses over sequence log-probabilities: DPO and its variants, and Condition Contrastive Alignment.

DPO (arXiv 2305.18290) as TRL's ``DPOTrainer`` computes it: with ``logits = (pi_c - pi_r) - (ref_c - ref_r)``
(summed log-probabilities of the chosen and rejected tokens under the policy and the frozen reference),
  sigmoid  -log s(b * logits) * (1 - e) - log s(-b * logits) * e      (e: label smoothing, cDPO)
  ipo      (logits - 1 / (2 b))**2, on log-probabilities averaged over each sequence's tokens (arXiv 2310.12036)
  hinge    max(0, 1 - b * logits)                                      (SLiC)
and rewards ``b * (pi - ref)``. The SFT term (TRL's ``rpo_alpha``) adds ``sft_weight`` x the chosen tokens' mean
negative log-likelihood.

CCA (arXiv 2410.09347, thu-ml/CCA's ``LlamaGen_finetune.py``) needs no pairs: each image's tokens are scored under
its own prompt (gap ``g = pi - ref``) and under another sample's prompt (gap ``n``):
  -log s(b * g) - w * log s(sign * b * n),  divided by max(lambda, 1)
with ``w = lambda``, ``sign = -1``; a row whose other prompt is the same text, or an unconditional row (both prompts
the CFG one), counts its second term as a positive (``w = 1``, ``sign = +1``), as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unigen.errors import ConfigError

OBJECTIVES = ("sft", "dpo", "cca")
LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class PreferenceSettings:
    """``stageN.preference`` in a recipe: the options of a ``dpo`` or ``cca`` stage."""

    beta: float = 0.1  # how far from the reference a reward of 1 is (IPO: its tau)
    loss: str = "sigmoid"  # dpo: sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # dpo sigmoid: the share of pairs assumed mislabelled (cDPO)
    sft_weight: float = 0.0  # x the chosen (cca: the matched) tokens' mean NLL, added to the loss
    cca_lambda: float = 1.0  # cca: the weight of the mismatched-prompt term
    # rows on the CFG (unconditional) prompt take part, a caption_dropout share of them: dpo compares the pair
    # under it; cca keeps it as a positive, so the model still has an unconditional branch to guide with
    unconditional: bool = False

    def validate(self, where: str, objective: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be > 0, got {self.beta}")
        if self.loss not in LOSSES:
            raise ConfigError(f"{where}.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{where}.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"{where}.label_smoothing applies to loss: sigmoid only, got loss: {self.loss}")
        if self.sft_weight < 0 or self.cca_lambda < 0:
            raise ConfigError(f"{where}.sft_weight and {where}.cca_lambda must be >= 0, got {self.sft_weight} and "
                              f"{self.cca_lambda}")
        if objective == "cca" and self.loss != "sigmoid":
            raise ConfigError(f"{where}.loss: {self.loss} is a dpo variant; a cca stage has its own loss")


@dataclass
class PairScores:
    """Per-row sequence log-probabilities (summed over the scored tokens) and token counts of a batch of pairs:
    the chosen (cca: matched-prompt) rows and the rejected (cca: mismatched-prompt) rows."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class PairLosses:
    losses: torch.Tensor  # (pairs,) with gradient
    chosen_rewards: torch.Tensor  # (pairs,) detached
    rejected_rewards: torch.Tensor
    correct: torch.Tensor  # (pairs,) 1.0 where the chosen reward beats the rejected
    sft: torch.Tensor  # (pairs,) detached: the chosen tokens' mean NLL


def _finish(losses, chosen_gap, rejected_gap, s: PairScores, settings: PreferenceSettings) -> PairLosses:
    nll = -s.chosen / s.chosen_tokens
    losses = losses + settings.sft_weight * nll
    chosen_rewards = (settings.beta * chosen_gap).detach()
    rejected_rewards = (settings.beta * rejected_gap).detach()
    return PairLosses(losses, chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
                      nll.detach())


def dpo_losses(s: PairScores, settings: PreferenceSettings) -> PairLosses:
    """The per-pair DPO loss of ``settings.loss`` (module docstring), rewards and the SFT term."""
    chosen, rejected, ref_chosen, ref_rejected = s.chosen, s.rejected, s.ref_chosen, s.ref_rejected
    if settings.loss == "ipo":  # IPO compares mean token log-probabilities (TRL divides by the lengths)
        chosen, ref_chosen = chosen / s.chosen_tokens, ref_chosen / s.chosen_tokens
        rejected, ref_rejected = rejected / s.rejected_tokens, ref_rejected / s.rejected_tokens
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    beta, smoothing = settings.beta, settings.label_smoothing
    if settings.loss == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing
    elif settings.loss == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    return _finish(losses, chosen - ref_chosen, rejected - ref_rejected, s, settings)


def cca_losses(s: PairScores, positive: torch.Tensor, settings: PreferenceSettings) -> PairLosses:
    """The per-row CCA loss (module docstring). ``positive[i]``: row i's second prompt is not a mismatch (the
    same text, or both unconditional), so its term pulls up instead of down, with weight 1."""
    gap, other_gap = s.chosen - s.ref_chosen, s.rejected - s.ref_rejected
    beta, lam = settings.beta, settings.cca_lambda
    weight = torch.where(positive, torch.ones_like(gap), torch.full_like(gap, lam))
    sign = torch.where(positive, torch.ones_like(gap), -torch.ones_like(gap))
    losses = (-F.logsigmoid(beta * gap) - weight * F.logsigmoid(sign * beta * other_gap)) / max(lam, 1.0)
    return _finish(losses, gap, other_gap, s, settings)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(rows, n, vocab) logits and (rows, n) targets -> (rows,) summed log-probabilities, in float32."""
    logps = torch.log_softmax(logits.float(), -1)
    return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)
