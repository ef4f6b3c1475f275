"""Tiny random checkpoints for tests and benchmarks (no hub access needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unigen.config import TokenIds

# ids used when no tokenizer is written next to the weights
TINY_TOKENS = TokenIds(bos=1, eos=2, pad=0, cfg_pad=3, image_start=4, image_end=5, image=6)


TINY_SPECIALS = ["<pad>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<begin_of_image>",
                 "<end_of_image>", "<image_placeholder>", "<|User|>", "<|Assistant|>"]
TINY_WORDS = ("a the of at in on is it what this image picture describe show shows large small red green blue "
              "yellow purple orange cyan white circle square triangle diamond top bottom left right center "
              "cat dog tree house car sky sun moon and with there are one two three : . , ? ! \n").split(" ")


def write_tiny_tokenizer(directory: str | Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer whose special ids equal ``TINY_TOKENS``; AutoTokenizer loads it offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = TINY_SPECIALS + TINY_WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    bos = TINY_SPECIALS[TINY_TOKENS.bos]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, TINY_TOKENS.bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=TINY_SPECIALS[TINY_TOKENS.eos],
                                   pad_token="<pad>", unk_token="w0",
                                   additional_special_tokens=TINY_SPECIALS[3:])
    fast.padding_side = "left"
    fast.save_pretrained(str(directory))


def tiny_janus_config(vocab_size: int = 256, image_token_id: int = TINY_TOKENS.image, width: int = 64,
                      layers: int = 2, image_size: int = 32, patch: int = 8, vq_mult=(1, 1, 2),
                      codebook: int = 64, max_positions: int = 512,
                      intermediate: int | None = None, heads: int = 4):
    """A transformers ``JanusConfig`` with every dimension small (SigLIP grid = VQ grid)."""
    from transformers import JanusConfig, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    text = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=intermediate or 2 * width,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, bos_token_id=TINY_TOKENS.bos,
                       eos_token_id=TINY_TOKENS.eos,
                       pad_token_id=TINY_TOKENS.pad, tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                               patch_size=patch, projection_dim=width, depth=2,
                               num_image_tokens=(image_size // patch) ** 2)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=codebook, latent_channels=32, base_channels=32,
                          channel_multiplier=list(vq_mult), num_res_blocks=1, projection_dim=width,
                          image_token_embed_dim=width, num_hidden_layers=2)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id,
                       tie_word_embeddings=False)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Replace every weight with seeded noise so that no layer is an identity or a zero map."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * std
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            elif "embed" in name or "embedding" in name:
                p.copy_(noise * 10)
            else:
                p.copy_(noise)


def make_tiny_hf_janus(directory: str | Path, seed: int = 0, **config_kwargs):
    """Build, randomise and save a tiny transformers ``JanusForConditionalGeneration``; return it."""
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_janus_config(**config_kwargs)
    config.text_config._attn_implementation = "eager"
    model = JanusForConditionalGeneration(config).eval()
    randomize_(model, seed)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = TINY_TOKENS.bos, TINY_TOKENS.eos
    gen.pad_token_id = TINY_TOKENS.cfg_pad  # transformers uses generation pad for the CFG prompt
    gen.generation_kwargs = {"boi_token_id": TINY_TOKENS.image_start}
    directory = Path(directory)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory, config.text_config.vocab_size)
    return model


def write_official_layout(model, directory: str | Path, extra_unused: bool = True) -> None:
    """Write a unigen model's weights in DeepSeek's official layout (config sections + key names)."""
    from safetensors.torch import save_file

    from unigen.models.checkpoint import official_state_dict

    cfg = model.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    llm = cfg.llm
    (directory / "config.json").write_text(json.dumps(official_config(cfg), indent=2))
    state = official_state_dict({k: v.detach().contiguous() for k, v in model.state_dict().items()}, llm)
    if extra_unused:  # real checkpoints carry these; loaders must ignore them
        state["vision_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, cfg.vision.width)
        state["gen_vision_model.quantize.codebook_used"] = torch.zeros(16)
    save_file(state, str(directory / "model.safetensors"))
    write_tiny_tokenizer(directory, llm.vocab_size)


def official_config(cfg) -> dict:
    """DeepSeek's official config.json for a ``UniGenConfig``. Small test models need the size parameters that
    the official presets fix; they go into the ``params`` sections as unigen extension keys."""
    llm = cfg.llm
    return {
        "model_type": "multi_modality",
        "language_config": {"model_type": "llama", "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
                            "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
                            "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
                            "max_position_embeddings": llm.max_position_embeddings},
        "vision_config": {"cls": "CLIPVisionTower", "params": {
            "model_name": "siglip_large_patch16_384", "select_layer": -1, "select_feature": "same",
            "image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size, "width": cfg.vision.width,
            "depth": cfg.vision.depth, "num_heads": cfg.vision.num_heads, "mlp_ratio": cfg.vision.mlp_ratio}},
        "aligner_config": {"cls": "MlpProjector", "params": {
            "projector_type": "mlp_gelu", "depth": cfg.aligner_depth, "input_dim": cfg.vision.width,
            "n_embed": llm.hidden_size}},
        "gen_vision_config": {"cls": "VQ-16", "params": {
            "image_token_size": cfg.vq.codebook_size, "n_embed": cfg.vq.embed_dim,
            "base_channels": cfg.vq.base_channels, "channel_mult": list(cfg.vq.channel_mult),
            "z_channels": cfg.vq.z_channels, "num_res_blocks": cfg.vq.num_res_blocks,
            "image_size": cfg.vq.image_size}},
        "gen_aligner_config": {"cls": "MlpProjector", "params": {
            "projector_type": "mlp_gelu", "depth": cfg.gen_aligner_depth, "input_dim": cfg.vq.embed_dim,
            "n_embed": llm.hidden_size}},
        "gen_head_config": {"cls": "vision_head", "params": {
            "n_embed": llm.hidden_size, "image_token_embed": cfg.gen_head_dim,
            "image_token_size": cfg.vq.codebook_size}},
    }
