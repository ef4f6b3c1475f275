"""Typed training recipes: YAML + ``key=value`` overrides, Janus's three-stage defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay floor
    batch_size: int = 8  # samples per micro-batch (per process)
    grad_accum: int = 1
    mixture: tuple[float, float, float] | None = None  # understanding : text : generation (None: Janus-Pro's)
    groups: list[str] | None = None  # trainable parameter groups (unigen.param_groups); None: Janus's
    lr_mult: dict = field(default_factory=dict)  # group -> learning-rate multiplier
    train_llm: bool | None = None  # None: default policy (Method B keeps the LLM frozen)
    weight_decay: float = 0.0




@dataclass
class TrainRecipe:
    data: str = ""  # JSONL manifest or an imagefolder with metadata.jsonl
    output_dir: str = "runs/unigen"
    init_from: str | None = None  # any checkpoint UniGenModel.from_pretrained reads (+ its tokenizer)
    model: dict = field(default_factory=dict)  # a fresh UniGenConfig (used when init_from is empty)
    vq_from: str | None = None  # a trained VQ tokenizer (unigen train-vq out_dir)
    siglip_from: str | None = None  # a trained SigLIP encoder (unigen train-siglip out_dir)
    tokenizer_vocab: int = 512  # word-level text tokenizer trained on the data for a fresh model
    question: str = "Describe the image."  # understanding prompt for caption lines
    system_prompt: str = ""  # "" keeps prompts short for small models; None would use Janus's
    caption_dropout: float = 0.1  # generation samples trained unconditionally, for CFG
    seed: int = 0
    device: str = "auto"
    bf16: bool = False  # autocast to bfloat16
    grad_checkpointing: bool = False
    grad_clip: float = 1.0
    save_every: int = 0  # periodic resumable checkpoints (0: only at the end of a stage)
    keep_last: int = 2
    log_every: int = 10
    tensorboard: bool = False
    stage1: StageConfig = field(default_factory=lambda: StageConfig(lr=1e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(lr=1e-4))
    stage3: StageConfig = field(default_factory=lambda: StageConfig(lr=4e-5))

    def __post_init__(self):
        for n in (1, 2, 3):  # unset stage choices take the Janus recipe's
            stage = self.stage(n)
            stage.groups = list(STAGE_GROUPS[n]) if stage.groups is None else stage.groups
            stage.mixture = MIXTURES[n] if stage.mixture is None else stage.mixture

    def stage(self, n: int) -> StageConfig:
        if n not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {n}")
        return getattr(self, f"stage{n}")


def load_recipe(path=None, overrides=(), **values) -> TrainRecipe:
    from unigen.tokenizer_training.config_io import load_config

    return load_config(TrainRecipe, path, overrides, **values)
