"""Typed training recipes: YAML + ``key=value`` overrides, Janus's three-stage defaults, validated on build."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from unigen.config_io import build_config, load_config
from unigen.errors import ConfigError
from unigen.models.param_groups import GROUPS
from unigen.training.lora import LoraSettings
from unigen.training.preference import OBJECTIVES, PreferenceSettings

TASKS = ("understanding", "text", "generation")  # the order of a mixture
# Janus recipe: I adaptors and heads; II + the LLM; III + the SigLIP encoder. The VQ never trains.
STAGE_GROUPS = {
    1: ["aligner", "gen_aligner", "gen_embed", "gen_head"],
    2: ["aligner", "gen_aligner", "gen_embed", "gen_head", "llm"],
    3: ["aligner", "gen_aligner", "gen_embed", "gen_head", "llm", "vision_encoder"],
}
# Janus-Pro's task mixtures, understanding : text-only : generation
MIXTURES = {1: (1.0, 0.0, 3.0), 2: (2.0, 3.0, 5.0), 3: (5.0, 1.0, 4.0)}


@dataclass
class StageConfig:
    steps: int = 100  # optimizer steps
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay floor
    batch_size: int = 8  # samples per micro-batch per process (global batch = batch_size x grad_accum x processes)
    grad_accum: int = 1
    mixture: tuple[float, float, float] | None = None  # understanding : text : generation (None: Janus-Pro's)
    groups: list[str] | None = None  # trainable parameter groups (unigen.models.param_groups); None: Janus's
    lr_mult: dict = field(default_factory=dict)  # group -> learning-rate multiplier
    train_llm: bool | None = None  # None: default policy (Method B keeps the LLM frozen)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's
    # LoRA adapters (training.lora.LoraSettings): only adapters and lora.modules_to_save train, whatever groups says
    lora: LoraSettings | None = None
    # sft: next-token loss on the data; dpo: preference pairs against the stage's start (docs/PREFERENCE.md);
    # cca: each image under its own prompt against another sample's prompt
    objective: str = "sft"
    preference: PreferenceSettings | None = None  # dpo / cca options (unset: PreferenceSettings' defaults)

    def validate(self, where: str) -> None:
        self._validate_objective(where)
        if isinstance(self.lora, dict):  # from YAML or a `stage2.lora.r=8` override
            self.lora = build_config(LoraSettings, self.lora, f"{where}.lora")
        if self.lora is not None:
            self.lora.validate(f"{where}.lora")
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise ConfigError(f"{where}.min_lr_ratio must be in [0, 1] and {where}.weight_decay >= 0, got "
                              f"{self.min_lr_ratio} and {self.weight_decay}")
        for name in ("steps", "batch_size", "grad_accum"):  # a stage of no steps would save an untrained model
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if len(self.mixture) != 3 or min(self.mixture) < 0 or sum(self.mixture) <= 0:
            raise ConfigError(f"{where}.mixture must be 3 non-negative weights ({' : '.join(TASKS)}) with a "
                              f"positive sum, got {list(self.mixture)}")
        for group, mult in self.lr_mult.items():
            if isinstance(mult, bool) or not isinstance(mult, int | float) or not math.isfinite(mult) or mult <= 0:
                raise ConfigError(f"{where}.lr_mult.{group} must be a finite number > 0, got {mult!r}")
        for key, names in (("groups", self.groups), ("lr_mult", list(self.lr_mult))):
            unknown = sorted(set(names) - GROUPS.keys())
            if unknown:
                raise ConfigError(f"{where}.{key}: unknown parameter group(s) {unknown}; known: {sorted(GROUPS)}")
        if "vq" in self.groups:
            raise ConfigError(f"{where}.groups: the VQ tokenizer stays frozen here (its codes are the generation "
                              "targets); train it with `unigen train-vq`")

    def _validate_objective(self, where: str) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"{where}.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if isinstance(self.preference, dict):  # from YAML or a `stage2.preference.beta=0.5` override
            self.preference = build_config(PreferenceSettings, self.preference, f"{where}.preference")
        if self.objective == "sft":
            if self.preference is not None:
                raise ConfigError(f"{where}.preference is set, but {where}.objective is sft; set objective: dpo or "
                                  "cca, or drop the preference section")
            return
        self.preference = self.preference or PreferenceSettings()
        self.preference.validate(f"{where}.preference", self.objective)


# ---- a whole run: the visual tokenizers as steps before the stages (unigen.training.run_plan) ----
@dataclass
class TokenizerSteps:
    """``tokenizers:`` in a recipe: train the VQ tokenizer and the SigLIP encoder as the run's first steps (in
    ``OUTPUT_DIR/vq`` and ``OUTPUT_DIR/siglip``), then pre-extract the VQ codes of ``data`` (``OUTPUT_DIR/codes``)
    for the stages. A step is a tokenizer recipe, ``{config: tokenizers/vq-shapes.yaml, steps: 1000, ...}`` (any
    of its keys, over the file's), or null for none; its shape is the model's (``model.vq`` / ``model.vision``)."""

    vq: dict | str | None = None
    siglip: dict | str | None = None
    images: str = ""  # what the tokenizers train on (a manifest or an image folder); "": the recipe's data
    # both on the CPU with 2 or more threads: in two processes at once (faster, but the one that finishes second
    # is not bitwise repeatable: unigen.training.tokenizer.side_by_side)
    side_by_side: bool = True
    codes: bool = True  # pre-extract the VQ codes of a JSONL manifest once, instead of encoding them every step

    def __post_init__(self):
        for name in ("vq", "siglip"):
            step = getattr(self, name)
            if isinstance(step, str):  # a path alone: its recipe as it is
                setattr(self, name, {"config": step})
            elif step is not None and not isinstance(step, dict):
                raise ConfigError(f"tokenizers.{name} must be a tokenizer recipe path or a mapping of its keys, "
                                  f"got {step!r}")

    @property
    def names(self) -> list[str]:
        """The tokenizers this run trains."""
        return [name for name in ("vq", "siglip") if getattr(self, name) is not None]


@dataclass
class TrainRecipe:
    data: str = ""  # JSONL manifest or an imagefolder with metadata.jsonl
    output_dir: str = "runs/unigen"
    init_from: str | None = None  # any checkpoint UniGenModel.from_pretrained reads (+ its tokenizer)
    model: dict = field(default_factory=dict)  # a fresh UniGenConfig (used when init_from is empty)
    # Method B from a base (concat) checkpoint: the start is loaded with zero-gated cross-attention blocks added
    # before every N-th decoder block (from_pretrained(fusion="cross_attention")); a start that already has
    # them at those places loads as saved
    add_cross_attention_every: int | None = None
    # edits read the source's VQ codes too (UniGenConfig.edit_source_codes): true/false sets it on the start
    # (a checkpoint or a fresh model), unset keeps what the start has
    edit_source_codes: bool | None = None
    # ---- pretrained parts of a fresh model (docs/PRETRAINED.md); a part without one keeps model:'s config
    llm_from: str | None = None  # a transformers causal LM (Llama, Mistral, Qwen2, Qwen3): folder or hub id
    vq_from: str | None = None  # a trained VQ tokenizer (unigen train-vq out_dir)
    siglip_from: str | None = None  # a trained SigLIP encoder (unigen train-siglip out_dir)
    tokenizer_vocab: int = 512  # word-level text tokenizer trained on the data for a fresh model
    question: str = "Describe the image."  # understanding prompt for caption lines
    system_prompt: str = ""  # "" keeps prompts short for small models; None would use Janus's
    caption_dropout: float = 0.1  # generation samples trained on the unconditional (CFG) prompt
    loss_weighting: str = "token"  # token: every supervised token weighs the same | task: each task's mean loss
    max_seq_len: int = 0  # longer rows are skipped and listed in bad_samples.jsonl (0: the LLM's max positions)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (under a launcher each process takes its own GPU)
    parallel: str = "auto"  # auto (what the launcher configured: DDP, FSDP or DeepSpeed) | ddp | fsdp
    bf16: bool | str = False  # bfloat16 mixed precision: true, false, or "auto" (where bf16 is native)
    grad_checkpointing: bool = False
    grad_clip: float = 1.0
    save_every: int = 0  # periodic resumable checkpoints (0: only the final weights of each stage)
    keep_last: int = 2
    overwrite: bool = False  # a fresh run may delete an earlier run's checkpoints of the same stage
    tensorboard: bool = True
    max_bad_fraction: float = 0.05  # skipped samples (listed in bad_samples.jsonl) above this share stop the run
    stage1: StageConfig = field(default_factory=lambda: StageConfig(lr=1e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(lr=1e-4))
    stage3: StageConfig = field(default_factory=lambda: StageConfig(lr=4e-5))
    tokenizers: TokenizerSteps | None = None  # the visual tokenizers as the run's first steps (TokenizerSteps)

    def __post_init__(self):
        for n in (1, 2, 3):  # unset stage choices take the Janus recipe's
            stage = self.stage(n)
            stage.groups = list(STAGE_GROUPS[n]) if stage.groups is None else list(stage.groups)
            stage.mixture = MIXTURES[n] if stage.mixture is None else tuple(stage.mixture)
            stage.validate(f"stage{n}")
        if isinstance(self.tokenizers, dict):  # from YAML or a `tokenizers.vq.steps=100` override
            self.tokenizers = build_config(TokenizerSteps, self.tokenizers, "tokenizers")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.loss_weighting not in ("token", "task"):
            raise ConfigError(f"loss_weighting must be token or task, got {self.loss_weighting!r}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"parallel must be auto, ddp or fsdp, got {self.parallel!r}")
        if self.bf16 not in (True, False, "auto"):
            raise ConfigError(f"bf16 must be true, false or auto, got {self.bf16!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.add_cross_attention_every is not None and self.add_cross_attention_every < 1:
            raise ConfigError(f"add_cross_attention_every must be >= 1 (a block before every N-th decoder block), "
                              f"got {self.add_cross_attention_every}")
        if self.save_every < 0 or self.keep_last < 1 or self.max_seq_len < 0 or self.grad_clip < 0:
            raise ConfigError(f"save_every, max_seq_len and grad_clip must be >= 0 and keep_last >= 1, got "
                              f"{self.save_every}, {self.max_seq_len}, {self.grad_clip} and {self.keep_last}")

    def stage(self, n: int) -> StageConfig:
        if n not in (1, 2, 3):
            raise ConfigError(f"stage must be 1, 2 or 3, got {n}")
        return getattr(self, f"stage{n}")


def load_recipe(path=None, overrides=(), **values) -> TrainRecipe:
    return load_config(TrainRecipe, path, overrides, **values)
