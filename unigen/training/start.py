"""Where a stage's weights come from: ``--init-from``, the previous stage's final weights, or a fresh model."""

from __future__ import annotations

from pathlib import Path

import torch

from unigen.config import UniGenConfig
from unigen.data.manifest import Sample
from unigen.errors import CheckpointNotFoundError, ConfigError
from unigen.models.llm_from import apply_llm_config, load_llm_from, load_llm_weights
from unigen.models.model import UniGenModel
from unigen.models.moe import upcycle_start
from unigen.models.vision_from import load_siglip_from
from unigen.models.vq_from import load_vq_from
from unigen.processor import JANUS_SYSTEM_PROMPT, UniGenProcessor, prompt_format
from unigen.text_tokenizer import special_token_ids, train_text_tokenizer
from unigen.training.recipe import TrainRecipe


def stage_dir(recipe: TrainRecipe, stage: int) -> Path:
    return Path(recipe.output_dir) / f"stage{stage}"


def build_fresh(recipe: TrainRecipe, samples: list[Sample]) -> tuple[UniGenModel, UniGenProcessor]:
    """A new model: each part from its ``*_from`` key (its own sizes and weights) or fresh at the recipe's
    ``model:`` sizes. ``llm_from`` brings the tokenizer too; otherwise a word-level one is trained on the data's
    text. The aligners, the generation embedding and the heads are built to the parts' widths."""
    config = UniGenConfig.from_dict(recipe.model)
    config.system_prompt = recipe.system_prompt
    torch.manual_seed(recipe.seed)  # the LLM's added token rows are drawn too
    llm = load_llm_from(recipe.llm_from) if recipe.llm_from else None
    if llm is not None:
        apply_llm_config(config, llm)
        tokenizer = llm.tokenizer
    else:
        tokenizer = train_word_tokenizer(recipe, samples, config)
    parts = load_image_parts(recipe, config)
    torch.manual_seed(recipe.seed)
    model = UniGenModel(config)
    if llm is not None:
        load_llm_weights(model, llm)
    for name, part in parts.items():  # built from the part's own config, so the weights fit exactly
        getattr(model, name).load_state_dict(part.state_dict())
    return model, UniGenProcessor(tokenizer, config)


def load_image_parts(recipe: TrainRecipe, config: UniGenConfig) -> dict[str, torch.nn.Module]:
    """``siglip_from`` / ``vq_from`` read before the model is built; each part's sizes replace the recipe's
    ``model.vision`` / ``model.vq`` (``vision.select_layer`` is the recipe's). Returns the modules by attribute."""
    parts = {}
    if recipe.siglip_from:
        if config.encoder != "siglip":
            raise ConfigError(f"siglip_from={recipe.siglip_from}: the recipe's model.encoder is {config.encoder!r}; "
                              "a SigLIP encoder needs encoder: siglip")
        parts["vision_model"], config.vision = load_siglip_from(recipe.siglip_from, config.vision)
    if recipe.vq_from:
        parts["gen_vision_model"], config.vq = load_vq_from(recipe.vq_from, config.vq)
    return parts


def train_word_tokenizer(recipe: TrainRecipe, samples: list[Sample], config: UniGenConfig):
    """A word-level tokenizer over every text a sample carries; sets ``config.tokens`` from it."""
    # edit instructions included (an unseen word would be <unk>)
    texts = [t for s in samples
             for t in (s.caption, s.text, s.instruction, *(x for turn in s.turns for x in turn)) if t]
    fmt = prompt_format(config.prompt_format)
    # the template's words too (role names of "janus", the question): unseen words would all become <unk>
    texts += [recipe.question, recipe.system_prompt or JANUS_SYSTEM_PROMPT, fmt.user, fmt.assistant]
    tok_dir = Path(recipe.output_dir) / "tokenizer"
    tokenizer = train_text_tokenizer(texts, tok_dir, vocab_size=recipe.tokenizer_vocab, kind="wordlevel")
    config.tokens = special_token_ids(tokenizer)
    if len(tokenizer) > config.llm.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.llm.vocab_size is "
                          f"{config.llm.vocab_size}; raise model.llm.vocab_size")
    return tokenizer


def load_pretrained(source, add_cross_attention_every: int | None = None) -> tuple[UniGenModel, UniGenProcessor]:
    """The checkpoint as saved; with ``add_cross_attention_every``, as Method B (blocks added where it has none)."""
    fusion = None if add_cross_attention_every is None else "cross_attention"
    model = UniGenModel.from_pretrained(source, fusion=fusion, cross_attention_every=add_cross_attention_every)
    return model, UniGenProcessor.from_pretrained(source, config=model.config)


def start_source(recipe: TrainRecipe, stage: int, init_from: str | None) -> str | None:
    """The checkpoint a fresh stage starts from (``None``: a new model), checked before any work."""
    source = init_from or recipe.init_from
    if source is None and stage > 1:
        previous = stage_dir(recipe, stage - 1) / "final"
        if not (previous / "config.json").is_file():
            raise CheckpointNotFoundError(f"stage {stage} starts from stage {stage - 1}'s final weights, but "
                                          f"{previous} does not exist: train that stage first or pass --init-from DIR")
        source = str(previous)
    if (init_from or recipe.init_from) and recipe.llm_from:  # (a later stage's start already holds the LLM)
        raise ConfigError(f"llm_from builds a new model, but init_from starts from {init_from or recipe.init_from}; "
                          "set one of them")
    if source is None and not recipe.model and not recipe.llm_from:
        raise ConfigError("no model to train: set init_from (a checkpoint), llm_from or a model: section in the recipe")
    return source


def load_start(recipe: TrainRecipe, stage: int, samples, init_from: str | None):
    source = start_source(recipe, stage, init_from)
    if source is None:
        model, processor = build_fresh(recipe, samples)
    else:
        if recipe.add_cross_attention_every is not None:
            torch.manual_seed(recipe.seed)  # the blocks it adds draw from the global RNG
        model, processor = load_pretrained(source, recipe.add_cross_attention_every)
    upcycle_start(model, recipe.model, source)  # model.llm.moe.upcycle_from_dense: a dense start becomes MoE
    if recipe.edit_source_codes is not None:  # a prompt layout, no weights: the config is all it changes
        model.config.edit_source_codes = recipe.edit_source_codes
    return model, processor


def lora_base(recipe: TrainRecipe, stage: int, init_from: str | None) -> str:
    """The checkpoint a LoRA stage adapts, as recorded with its adapters (a local folder by its absolute path)."""
    source = start_source(recipe, stage, init_from)
    if source is None:
        raise ConfigError(f"stage{stage}.lora: LoRA adapts a trained model, but stage {stage} would start from a new "
                          "one; set init_from (or --init-from) to a checkpoint, or drop the lora section")
    return str(Path(source).resolve()) if Path(source).exists() else source
