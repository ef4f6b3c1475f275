"""``llm_from``: a pretrained transformers causal LM (a folder or a hub id) as a unified model's decoder.

The families most small LLMs belong to load: Llama (Llama 2/3, SmolLM, DeepSeek-LLM, TinyLlama), Mistral,
Qwen2/2.5 and Qwen3, and the mixture-of-experts ones Qwen2-MoE, OLMoE and Mixtral (``llm.moe``). transformers'
``from_pretrained`` reads the files (it knows every format and dtype); this module maps its config to an
:class:`LLMConfig` and its weights to unigen's key names, and makes the LLM's tokenizer the model's: Janus's
image tokens (and its role tokens where the LLM has no chat template) are added as special tokens, and the
embedding and the head grow by their rows with transformers' ``resize_token_embeddings`` (new rows drawn around
the mean of the old ones, so the text distribution barely moves). A tied head is loaded as a copy of the
embedding: Janus keeps the head untied, and a shared parameter would not survive FSDP's per-module sharding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from unigen.config import ROPE_SCALING_KEYS, SPECIAL_TOKEN_TEXT, LLMConfig, MoEConfig, TokenIds
from unigen.errors import CheckpointError, CheckpointNotFoundError, ConfigError

# config.json "architectures" -> model_type; every other architecture is refused by name
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "Qwen2MoeForCausalLM": "qwen2_moe", "OlmoeForCausalLM": "olmoe",
             "MixtralForCausalLM": "mixtral"}
ROLE_TOKENS = ("<|User|>", "<|Assistant|>")  # the janus-pro format's roles, for an LLM without a chat template
ADDED_TOKENS = tuple(SPECIAL_TOKEN_TEXT[k] for k in ("image_start", "image_end", "image", "cfg_pad"))
LLM_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass
class PretrainedLLM:
    """What ``llm_from`` brings: the decoder's config, its weights under ``language_model.*`` (in-memory names,
    grown by the added tokens' rows), the grown tokenizer, the special ids and the prompt format."""

    config: LLMConfig
    state: dict[str, torch.Tensor]
    tokenizer: object
    tokens: TokenIds
    prompt_format: str
    source: str


def resolve_llm_dir(source: str) -> Path:
    """A local folder as is; a hub id from the hub or its cache; offline, one line that says to download it."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(f"llm_from={source}: the folder has no config.json; pass a transformers "
                                          "causal-LM folder (config.json, safetensors, tokenizer files)")
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise CheckpointNotFoundError(f"llm_from={source}: no such folder (and not a hub id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=LLM_FILES))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated: every one ends in the same advice
        raise CheckpointNotFoundError(
            f"llm_from={source} is not a local folder and could not be fetched from the hub ({type(err).__name__}); "
            f"download it first (`hf download {source} --local-dir DIR`) and pass llm_from=DIR") from None


def llm_config_from(hf_config, source: str) -> LLMConfig:
    """transformers' config of a supported family -> unigen's decoder config (vocab_size as the checkpoint's)."""
    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    if arch not in SUPPORTED:
        raise ConfigError(f"llm_from={source}: architecture {arch} is not supported; supported: "
                          f"{', '.join(SUPPORTED)}")
    if getattr(hf_config, "hidden_act", "silu") != "silu" or getattr(hf_config, "mlp_bias", False):
        raise ConfigError(f"llm_from={source}: unigen's decoder has a bias-free SwiGLU feed-forward; this {arch} has "
                          f"hidden_act={hf_config.hidden_act!r}, mlp_bias={getattr(hf_config, 'mlp_bias', False)}")
    if getattr(hf_config, "use_sliding_window", False):
        raise ConfigError(f"llm_from={source}: sliding-window attention (use_sliding_window) is not supported")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    positions = hf_config.max_position_embeddings
    family = SUPPORTED[arch]
    window = getattr(hf_config, "sliding_window", None) if family in ("mistral", "mixtral") else None
    if window:  # unigen attends over everything: exact up to the window, so positions stop there
        positions = min(positions, window)
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    kind = rope.get("rope_type", "default")
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"llm_from={source}: rope_type {kind!r} is not supported; supported: "
                          f"{sorted(ROPE_SCALING_KEYS)}")
    scaling = None if kind == "default" else {"rope_type": kind, **{k: rope[k] for k in ROPE_SCALING_KEYS[kind]}}
    bias = bool(getattr(hf_config, "attention_bias", False))
    qkv_bias = bias or family == "qwen2" or (family == "qwen2_moe" and bool(getattr(hf_config, "qkv_bias", True)))
    return LLMConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads, max_position_embeddings=positions,
        rms_norm_eps=hf_config.rms_norm_eps, rope_theta=float(theta),
        head_dim=None if head_dim * heads == hf_config.hidden_size else head_dim,
        qkv_bias=qkv_bias, o_bias=bias,
        qk_norm=family in ("qwen3", "olmoe"), qk_norm_scope="all" if family == "olmoe" else "head",
        rope_scaling=scaling, moe=moe_config_from(hf_config, family, source))


def moe_config_from(hf_config, family: str, source: str) -> MoEConfig | None:
    """The MoE part of a Qwen2-MoE, OLMoE or Mixtral config (None for a dense family). All three take the softmax
    over every expert, then the top k; Mixtral always renormalises those, the others as ``norm_topk_prob`` says."""
    if family not in ("qwen2_moe", "olmoe", "mixtral"):
        return None
    if getattr(hf_config, "clip_qkv", None) is not None:
        raise ConfigError(f"llm_from={source}: clip_qkv (clamping q, k and v) is not supported")
    if getattr(hf_config, "router_jitter_noise", None):
        raise ConfigError(f"llm_from={source}: router_jitter_noise is not supported; set it to 0 in its config.json")
    aux = float(getattr(hf_config, "router_aux_loss_coef", 0.01) or 0.0)
    common = dict(num_experts=hf_config.num_experts if family != "mixtral" else hf_config.num_local_experts,
                  top_k=hf_config.num_experts_per_tok, router="softmax_topk", aux_loss_weight=aux,
                  normalize_top_k=family == "mixtral" or bool(hf_config.norm_topk_prob))
    if family != "qwen2_moe":  # every layer routed, experts of intermediate_size
        return MoEConfig(**common, expert_size=hf_config.intermediate_size)
    shared = hf_config.shared_expert_intermediate_size
    if not shared:
        raise ConfigError(f"llm_from={source}: a Qwen2-MoE layer always has a gated shared expert, but "
                          f"shared_expert_intermediate_size is {shared!r}")
    return MoEConfig(**common, expert_size=hf_config.moe_intermediate_size, num_shared_experts=1,
                     shared_expert_size=shared, shared_expert_gate=True, every_n=hf_config.decoder_sparse_step,
                     dense_layers=list(hf_config.mlp_only_layers or []))


def grow_tokenizer(tokenizer) -> str:
    """Janus's image tokens (and the janus-pro roles where there is no chat template) added as special tokens,
    left padding, a pad token (the EOS where it has none: padded columns are masked). Returns the prompt format."""
    from tokenizers import AddedToken

    fmt = "chat-template" if tokenizer.chat_template else "janus-pro"
    texts = [*ADDED_TOKENS, *(ROLE_TOKENS if fmt == "janus-pro" else ())]
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in texts if t not in vocab],
                         special_tokens=True)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"llm_from={tokenizer.name_or_path}: the tokenizer has no EOS token; a reply needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return fmt


def end_of_turn(tokenizer) -> int:
    """The id a reply ends with: the first special token the chat template writes after an assistant message
    (``<|im_end|>`` for Qwen, ``<|eot_id|>`` for Llama 3), else the tokenizer's EOS."""
    if not tokenizer.chat_template:
        return tokenizer.eos_token_id
    reply = "unigen-reply"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}],
                                         tokenize=False)
    after = text[text.rfind(reply) + len(reply):]
    specials = sorted((after.find(t), t) for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab())
                      if t and t in after)
    return tokenizer.convert_tokens_to_ids(specials[0][1]) if specials else tokenizer.eos_token_id


def token_ids(tokenizer) -> TokenIds:
    vocab = tokenizer.get_vocab()
    eos = end_of_turn(tokenizer)
    # no BOS (Qwen): the janus-pro format and the CFG row start with the EOS, as GPT-2-style models do
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return TokenIds(bos=bos, eos=eos, pad=tokenizer.pad_token_id,
                    **{k: vocab[SPECIAL_TOKEN_TEXT[k]] for k in ("cfg_pad", "image_start", "image_end", "image")})


def unigen_state(hf_state: dict[str, torch.Tensor], config: LLMConfig) -> dict[str, torch.Tensor]:
    """transformers' ``model.*`` / ``lm_head.*`` keys -> unigen's in-memory ``language_model.*`` ones."""
    from unigen.models.checkpoint import fused_state_dict

    state = {f"language_model.{k}": v for k, v in hf_state.items() if "rotary_emb" not in k}
    for key in [k for k in state if k.endswith(".shared_expert.gate_proj.weight")]:  # Qwen2-MoE: gate|up fused
        up = key.replace(".gate_proj.", ".up_proj.")
        state[key.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat([state.pop(key), state.pop(up)])
    embed, head = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    if head not in state or state[head].data_ptr() == state[embed].data_ptr():  # tied: untie, they train apart
        state[head] = state[embed].clone()
    return fused_state_dict(state, config)


def load_llm_from(source: str) -> PretrainedLLM:
    """Read a causal LM (folder or hub id) with transformers and map it to unigen (fp32 weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = resolve_llm_dir(str(source))
    arch = read_architecture(directory)
    if arch not in SUPPORTED:  # before transformers, which may not know the model type at all
        raise ConfigError(f"llm_from={source}: architecture {arch} is not supported; supported: {', '.join(SUPPORTED)}")
    try:
        hf_config = AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"llm_from={source}: config.json could not be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None
    config = llm_config_from(hf_config, str(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"llm_from={source}: its tokenizer could not be loaded ({type(err).__name__}); the "
                              "folder needs the LLM's tokenizer files beside config.json") from None
    fmt = grow_tokenizer(tokenizer)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:  # missing, damaged or mis-sized weights
        raise CheckpointError(f"llm_from={source}: its weights do not load as its config.json describes "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from None
    rows = max(len(tokenizer), config.vocab_size)  # tokens that fit a checkpoint's spare rows (Qwen) use them
    if rows > config.vocab_size:
        hf_model.resize_token_embeddings(rows, mean_resizing=True)
    config.vocab_size = rows
    state = unigen_state(hf_model.state_dict(), config)
    return PretrainedLLM(config, state, tokenizer, token_ids(tokenizer), fmt, str(source))


def read_architecture(directory: Path) -> str:
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory / 'config.json'} could not be read as JSON ({err})") from None
    architectures = raw.get("architectures") if isinstance(raw, dict) else None
    return (architectures or [f"(none named; model_type {raw.get('model_type')!r})"])[0]


def apply_llm_config(config, llm: PretrainedLLM) -> None:
    """``config`` (a UniGenConfig) takes the LLM's sizes, special ids and prompt format; the aligners and heads
    are built at its width."""
    config.llm = llm.config
    config.tokens = llm.tokens
    config.prompt_format = llm.prompt_format


def load_llm_weights(model, llm: PretrainedLLM) -> None:
    """The LLM's weights into ``model.language_model`` (a model built from :func:`apply_llm_config`'s config)."""
    prefix = "language_model."
    lm_state = {k[len(prefix):]: v for k, v in llm.state.items()}
    expected = model.language_model.state_dict()
    wrong = sorted(set(expected) ^ set(lm_state)) or sorted(k for k in expected
                                                            if expected[k].shape != lm_state[k].shape)
    if wrong:
        raise CheckpointError(f"llm_from={llm.source}: the LLM's weights do not fit the decoder built for them "
                              f"(first: {wrong[0]}); this is a bug in unigen.models.llm_from")
    model.language_model.load_state_dict(lm_state)
