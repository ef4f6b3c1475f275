"""A mixture-of-experts feed-forward (``llm.moe``): top-k routed SwiGLU experts, dropless, with shared experts.

Routing is dropless: every token reaches its ``top_k`` experts. Its (token, expert) pairs are sorted by expert
and each expert runs one matmul over its tokens (``torch._grouped_mm`` on a GPU that has it, else a loop over the
experts that received tokens, each on a view of its weights). A captured or compiled decode step cannot have
shapes that depend on the routing, so it gathers each token's k experts' weights and runs batched matmuls.

Parameters follow transformers' MoE layout (Qwen2-MoE, OLMoE, Mixtral): ``gate.weight`` (experts, width) the
router, ``experts.gate_up_proj`` (experts, 2 * expert width, width), ``experts.down_proj`` (experts, width, expert
width), ``shared_expert`` a dense SwiGLU and ``shared_expert_gate`` its sigmoid gate.

Training losses (``router_losses``): the routing of each training forward is recorded, and the step adds the
load-balancing loss (Switch Transformer's ``E * sum_i f_i * P_i``, taken per sequence over its real tokens, so it
does not depend on how a batch is split over processes or micro-batches) and the router z-loss.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unigen.config import MoEConfig
from unigen.config_io import build_config
from unigen.errors import ConfigError
from unigen.models.feed_forward import MLP, swiglu_into

log = logging.getLogger(__name__)
IDLE_WARNING_STEPS = 100  # an expert that gets no token for this many training steps in a row is named
_RECOMPUTING = contextvars.ContextVar("moe_recomputing", default=False)


@contextlib.contextmanager
def recomputing():
    """Gradient checkpointing's second forward: the routing it repeats is not recorded again."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint``: nothing on the forward, :func:`recomputing` on the rerun."""
    return contextlib.nullcontext(), recomputing()


@dataclass
class Routing:
    """One training forward's routing of (batch * n) tokens: router logits (float32) and the chosen experts."""

    logits: torch.Tensor  # (tokens, experts)
    chosen: torch.Tensor  # (tokens, top_k)
    rows: int


class Experts(nn.Module):
    """The routed experts' weights as two 3-D parameters (one grouped matmul each).

    The routed products run in this module's own call (``forward``), so that a LoRA over the experts (PEFT's
    ``target_parameters``, which puts ``W + alpha/r * B @ A`` in place of a weight for the length of the call)
    adapts every path."""

    def __init__(self, num_experts: int, width: int, expert_width: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_width, width))
        self.down_proj = nn.Parameter(torch.empty(num_experts, width, expert_width))
        for p in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """(tokens, width) through each token's ``chosen`` (tokens, k) experts, weighted by ``weights`` and summed."""
        if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return (self.gathered(x, chosen) * weights[..., None]).sum(1)
        if few_tokens(x, chosen, self.gate_up_proj.shape[0]):
            return self.pairs(x, weights, chosen)
        return self.sorted(x, weights, chosen)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` over rows ``x`` (views of its weights, no copy)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def sorted(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Dropless: the (token, expert) pairs sorted by expert, one matmul per expert, scattered back."""
        k = chosen.shape[1]
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0])
        rows = x[token]
        if _grouped_mm_fits(rows, self.down_proj.shape[-1]):
            y = self.grouped(rows, counts)
        else:
            pieces = rows.split(counts.tolist())
            y = torch.cat([self.one(e, piece) for e, piece in enumerate(pieces) if len(piece)])
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, y)

    def pairs(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """A decode step's few tokens: each (token, expert) pair as two matrix-vector products added in place into
        the token's output; no sort, gather or scatter, and the experts no token chose are not touched. The pairs
        run expert by expert, so that an expert two tokens chose is read from memory once (then from cache)."""
        out = torch.zeros_like(x)
        rows, sums = x.unbind(0), out.unbind(0)
        pairs = sorted((e, t, scale) for t, (experts, scales) in enumerate(zip(chosen.tolist(), weights.tolist()))
                       for e, scale in zip(experts, scales, strict=True))
        for e, t, scale in pairs:
            swiglu_into(sums[t], rows[t], self.gate_up_proj[e], self.down_proj[e], scale)
        return out

    def grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, ``counts`` rows each, through their experts in two grouped matmuls."""
        ends = counts.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x, self.gate_up_proj.transpose(1, 2), offs=ends).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=ends)

    def gathered(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """(tokens, width) through each token's ``chosen`` (tokens, k) experts -> (tokens, k, width); shapes do
        not depend on the routing (a captured decode step)."""
        h = torch.matmul(self.gate_up_proj[chosen], x[:, None, :, None]).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        return torch.matmul(self.down_proj[chosen], (F.silu(gate) * up)[..., None]).squeeze(-1)


def few_tokens(x: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> bool:
    """A CPU inference call with no more (token, expert) pairs than experts (a decode step): per-pair products
    beat sorting the pairs by expert, whose fixed cost is a dozen small ops."""
    return (x.is_cpu and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and chosen.numel() <= num_experts)


class MoEFeedForward(nn.Module):
    """Routed experts (+ shared experts), in place of a block's dense ``MLP``."""

    def __init__(self, width: int, dense_width: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        expert_width, shared_width = cfg.widths(dense_width)
        self.gate = nn.Linear(width, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, width, expert_width)
        self.shared_expert = MLP(width, shared_width) if shared_width else None
        self.shared_expert_gate = nn.Linear(width, 1, bias=False) if cfg.shared_expert_gate else None
        self.records: list[Routing] = []  # this step's training forwards, drained by ``router_losses``
        # since the last log: real tokens per expert; balance-loss sum, rows, router-entropy sum, real tokens
        self.load = torch.zeros(cfg.num_experts, dtype=torch.float64, device="cpu")
        self.stats = torch.zeros(4, dtype=torch.float64, device="cpu")
        self.idle_steps = torch.zeros(cfg.num_experts, dtype=torch.long, device="cpu")  # logged steps without a token

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, width) -> router logits, the top-k weights (x's dtype) and the chosen experts."""
        logits = self.gate(x)
        k = self.cfg.top_k
        if self.cfg.router == "topk_softmax":
            top, chosen = torch.topk(logits, k, dim=-1)
            weights = top.float().softmax(-1)
        else:
            weights, chosen = torch.topk(logits.float().softmax(-1), k, dim=-1)
            if self.cfg.normalize_top_k:
                weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, chosen = self.route(x)
        if self.training and torch.is_grad_enabled() and not _RECOMPUTING.get():
            self.records.append(Routing(logits.float(), chosen, shape[0]))
        out = self.experts(x, weights, chosen)
        if self.shared_expert is not None:
            out = self._add_shared(x, out, few_tokens(x, chosen, self.cfg.num_experts))
        return out.view(shape)

    def _add_shared(self, x: torch.Tensor, out: torch.Tensor, few: bool) -> torch.Tensor:
        """``out`` plus the (gated) shared experts, their products as module calls (``F.linear``, or an adapter's
        forward); a decode step's ``out`` (its own, no gradient) takes them in place."""
        mlp = self.shared_expert
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        shared = mlp.down_proj(F.silu(gate) * up)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out.add_(shared) if few else out + shared


def _grouped_mm_fits(x: torch.Tensor, expert_width: int) -> bool:
    """``torch._grouped_mm`` runs bfloat16 on Hopper and newer GPUs, with 16-byte aligned rows; elsewhere the
    per-expert loop does the same products."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0) and x.shape[-1] % 8 == 0 and expert_width % 8 == 0


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def router_losses(model: nn.Module, attention_mask: torch.Tensor | None, row_weights: torch.Tensor) -> torch.Tensor:
    """The routing recorded by the training forwards since the last call, as a loss term: per layer and per row,
    ``aux_loss_weight * E * sum_i f_i P_i + z_loss_weight * mean(logsumexp(logits) ** 2)`` over the row's real
    tokens (``attention_mask``, extended by ones to the forward's length), times ``row_weights`` (the row's
    supervised tokens, so that the step's token normalisation makes it a mean), summed. Also counts the load."""
    total = row_weights.new_zeros((), dtype=torch.float32)
    for layer in moe_layers(model):
        for record in layer.records:
            total = total + layer_loss(layer, record, attention_mask, row_weights)
        layer.records.clear()
    return total


def layer_loss(layer: MoEFeedForward, record: Routing, attention_mask, row_weights) -> torch.Tensor:
    cfg, b = layer.cfg, record.rows
    n = record.logits.shape[0] // b
    logits = record.logits.view(b, n, -1)
    real = torch.ones(b, n, device=logits.device)
    if attention_mask is not None:
        real[:, : attention_mask.shape[1]] = attention_mask[:, -n:].to(real.dtype)
    chosen = F.one_hot(record.chosen.view(b, n, -1), cfg.num_experts).sum(2).to(real.dtype)  # (b, n, E)
    per_token = real.sum(1).clamp_min(1)
    fraction = (chosen * real[..., None]).sum(1) / per_token[:, None]  # f_i per row (sums to top_k, as transformers)
    probs = logits.softmax(-1)
    mean_prob = (probs * real[..., None]).sum(1) / per_token[:, None]  # P_i per row
    balance = cfg.num_experts * (fraction * mean_prob).sum(-1)
    z = (torch.logsumexp(logits, -1) ** 2 * real).sum(1) / per_token
    with torch.no_grad():
        layer.load += (chosen * real[..., None]).sum((0, 1)).double().cpu()
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)
        layer.stats += torch.stack([balance.sum(), torch.tensor(float(b), device=real.device), (entropy * real).sum(),
                                    real.sum()]).double().cpu()
    return ((cfg.aux_loss_weight * balance + cfg.z_loss_weight * z) * row_weights).sum()


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """The training log's MoE columns since the last call (this process's tokens): per MoE layer ``l`` its
    balance loss ``moe_aux_l``, mean router entropy ``moe_entropy_l`` and each expert's share of the routed
    tokens ``moe_load_l_e``; ``moe_aux`` their mean. An expert without a token for ``IDLE_WARNING_STEPS``
    logged steps in a row is named once."""
    row: dict[str, float] = {}
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]
    for name, layer in named:
        balance, rows, entropy, tokens = layer.stats.tolist()
        if not rows:
            continue
        index = _layer_index(name)
        row[f"moe_aux_{index}"] = balance / rows
        row[f"moe_entropy_{index}"] = entropy / max(tokens, 1.0)
        shares = layer.load / layer.load.sum().clamp_min(1.0)
        row.update({f"moe_load_{index}_e{e}": float(share) for e, share in enumerate(shares)})
        layer.idle_steps = torch.where(layer.load == 0, layer.idle_steps + 1, 0)
        for e in (layer.idle_steps == IDLE_WARNING_STEPS).nonzero().flatten().tolist():
            log.warning("MoE layer %s: expert %d has received no token for %d steps; the router has stopped using "
                        "it (raise llm.moe.aux_loss_weight to balance the load)", index, e, IDLE_WARNING_STEPS)
        layer.load.zero_()
        layer.stats.zero_()
    aux = [v for k, v in row.items() if k.startswith("moe_aux_")]
    if aux:
        row["moe_aux"] = sum(aux) / len(aux)
    return row


def _layer_index(name: str) -> str:
    """``...layers.3.mlp`` -> ``l3``."""
    parts = name.split(".")
    return f"l{parts[parts.index('layers') + 1]}" if "layers" in parts else name


@torch.no_grad()
def upcycle(model: nn.Module, cfg: MoEConfig) -> None:
    """Sparse upcycling of a dense unified model, in place: each MoE layer's experts start as copies of its dense
    feed-forward, the shared experts' output at zero and the router at its random start, so the model computes
    what the dense one did (the k weights of equal experts sum to 1) until training moves them apart. A router at
    zero would tie every token's scores: the k experts it picks by index get the same tokens with the same weight,
    hence the same gradients, and stay copies of each other for good."""
    llm = model.config.llm
    if cfg.expert_size not in (None, llm.intermediate_size):
        raise ConfigError(f"llm.moe.upcycle_from_dense copies the dense feed-forward into every expert, so "
                          f"llm.moe.expert_size must be the dense width {llm.intermediate_size} (or unset), got "
                          f"{cfg.expert_size}")
    if cfg.router == "softmax_topk" and not cfg.normalize_top_k:
        raise ConfigError("llm.moe.upcycle_from_dense needs each token's expert weights to sum to 1: set "
                          "llm.moe.normalize_top_k true (or router topk_softmax)")
    cfg = MoEConfig(**{**vars(cfg), "upcycle_from_dense": False})  # the result is a plain MoE model
    for i, block in enumerate(model.language_model.model.layers):
        if not cfg.is_moe_layer(i):
            continue
        dense = block.mlp
        moe = MoEFeedForward(llm.hidden_size, llm.intermediate_size, cfg).to(dense.down_proj.weight)
        moe.experts.gate_up_proj.copy_(dense.gate_up_proj.weight.expand_as(moe.experts.gate_up_proj))
        moe.experts.down_proj.copy_(dense.down_proj.weight.expand_as(moe.experts.down_proj))
        if moe.shared_expert is not None:
            moe.shared_expert.down_proj.weight.zero_()
        block.mlp = moe.train(dense.training)
    llm.moe = cfg


def upcycle_start(model: nn.Module, recipe_model: dict, start: str | None) -> None:
    """A stage's start (``start``: the checkpoint it loaded, None for a new model) upcycled when the recipe's
    ``model.llm.moe.upcycle_from_dense`` asks for it; a start that is already MoE (a later stage) is kept."""
    moe = (recipe_model.get("llm") or {}).get("moe") if isinstance(recipe_model, dict) else None
    if not isinstance(moe, dict) or not moe.get("upcycle_from_dense"):
        return
    cfg = build_config(MoEConfig, moe, "model.llm.moe")
    if start is None:
        raise ConfigError("model.llm.moe.upcycle_from_dense starts the experts from a dense checkpoint's "
                          "feed-forward: set init_from (or --init-from) to one")
    if model.config.llm.moe is None:
        upcycle(model, cfg)
        log.info("upcycled %s to %d experts (top %d) per MoE layer", start, cfg.num_experts, cfg.top_k)
