"""``llm_from``: a transformers causal LM (Llama, Mistral, Qwen2, Qwen3) as unigen's decoder.

Tiny random models of each family are built with transformers, saved with a tiny offline tokenizer, loaded back
by ``unigen.models.llm_from`` and compared with transformers' own forward: logits on left-padded text, through
a KV cache, and 32 greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unigen.config import UniGenConfig
from unigen.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from unigen.generation.sampling import generate_text
from unigen.models.decoder import positions_from_mask
from unigen.models.llm_from import apply_llm_config, load_llm_from, load_llm_weights
from unigen.models.model import UniGenModel
from unigen.processor import UniGenProcessor
from unigen.prompts import left_pad
from unigen.shapes import write_dataset
from unigen.training import load_recipe, run_stage

transformers = pytest.importorskip("transformers")
TRAIN = Path(__file__).parent.parent / "train"

WORDS = ("a red blue green circle square triangle at the top bottom left right of in image what is this picture "
         "describe there are two one small large").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6)
FAMILIES = {
    # Llama 3.2-style: llama3 rope scaling, a BOS, its own chat template, attention biases (attention_bias)
    "llama": ("LlamaForCausalLM", dict(attention_bias=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), "llama3"),
    # Mistral: linear rope scaling, a sliding window, no chat template (the janus-pro roles are added)
    "mistral": ("MistralForCausalLM", dict(sliding_window=128, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), None),
    # Qwen2.5-style: q/k/v biases, tied embeddings, no BOS, ChatML
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0}), "chatml"),
    # Qwen3: per-head q/k RMSNorm, head_dim 32 with 4 heads of a width-64 model
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0}), "chatml"),
}


def tiny_tokenizer(template: str | None):
    """A tokenizer built offline with the family's special tokens and chat template: word-level for Llama and
    Mistral, byte-level BPE for Qwen (transformers rebuilds a Qwen tokenizer as byte-level BPE from its files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"],
                "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None: ["<s>", "</s>"]}[template]
    if template == "chatml":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    else:
        vocab = {t: i for i, t in enumerate(["<unk>", *specials, *WORDS, "\n", ":", "?", "."])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None if template == "chatml" else specials[0],
                                   eos_token=specials[0] if template == "chatml" else specials[1],
                                   unk_token=None if template == "chatml" else "<unk>",
                                   additional_special_tokens=specials[2:] if template else None)
    if template:
        fast.chat_template = {"llama3": LLAMA3, "chatml": CHATML}[template]
    return fast


def save_family(family: str, directory, seed: int = 0):
    """A tiny random model of ``family`` and its tokenizer saved in ``directory``; returns the model."""
    arch, extra, template = FAMILIES[family]
    tokenizer = tiny_tokenizer(template)
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(vocab_size=len(tokenizer), **SMALL, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random norms and biases, so that every weight the loader maps is exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model


def unified(llm) -> UniGenModel:
    """A smoke-sized unified model around the loaded LLM."""
    config = UniGenConfig.from_name("smoke")
    apply_llm_config(config, llm)
    torch.manual_seed(1)
    model = UniGenModel(config)
    load_llm_weights(model, llm)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = save_family(request.param, directory)
    torch.manual_seed(2)
    llm = load_llm_from(str(directory))
    return request.param, hf, unified(llm), UniGenProcessor(llm.tokenizer, unified_config(llm))


def unified_config(llm) -> UniGenConfig:
    config = UniGenConfig.from_name("smoke")
    apply_llm_config(config, llm)
    return config


def text_rows(processor, texts):
    rows = [processor.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    return left_pad(rows, processor.tokens.pad)


@torch.no_grad()
def test_logits_match_transformers_with_left_padding(family):
    name, hf, model, processor = family
    ids, mask = text_rows(processor, ["a red circle at the top left of the image",
                                      "what is in this picture ?", "two small blue square"])
    vocab = hf.config.vocab_size
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    ours = model(input_ids=ids, attention_mask=mask).logits[..., :vocab]
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= 1e-4


@torch.no_grad()
def test_cached_decoding_matches_transformers(family):
    """Prefill a left-padded batch, then decode token by token through the KV cache: each step's logits are
    transformers' full-sequence logits at that position."""
    name, hf, model, processor = family
    ids, mask = text_rows(processor, ["describe the picture", "there are two large green triangle in the image"])
    extra = torch.tensor([[3, 9, 12, 7], [5, 6, 7, 8]]) + 4
    full, full_mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1)
    ref = hf(input_ids=full, attention_mask=full_mask, position_ids=positions_from_mask(full_mask)).logits
    vocab = hf.config.vocab_size
    cache = model.decoder.new_cache(2, full.shape[1])
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits[:, -1:]
    steps = [out]
    for i in range(extra.shape[1] - 1):
        steps.append(model(input_ids=extra[:, i : i + 1], past_key_values=cache).logits)
    ours = torch.cat(steps, 1)[..., :vocab]
    assert (ours - ref[:, ids.shape[1] - 1 : -1]).abs().max() <= 1e-4


@torch.no_grad()
def test_greedy_generation_is_transformers(family):
    name, hf, model, processor = family
    ids, mask = text_rows(processor, ["a red circle at the", "what is this"])
    hf.generation_config.eos_token_id = None
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                      pad_token_id=processor.tokens.pad)[:, ids.shape[1]:]
    ours = generate_text(model, ids, mask, max_new_tokens=32, eos_token_id=-1)
    assert ref.tolist() == ours


def test_prompts_follow_the_chat_template_token_for_token(tmp_path):
    """A dialogue's pieces (prompts unsupervised, replies supervised up to the end-of-turn token) are the
    template's rendering of the conversation, tokenized in one pass; a generation prompt is the template's reply
    slot then <begin_of_image>; an LLM without a template gets the janus-pro roles and ends replies with its EOS."""
    save_family("qwen2", tmp_path / "qwen2")
    llm = load_llm_from(str(tmp_path / "qwen2"))
    processor, tok = UniGenProcessor(llm.tokenizer, unified_config(llm)), llm.tokenizer
    turns = ["what is this?", "a red circle", "and the square?", "it is blue"]
    segments = processor.prompts.dialogue(turns)
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    joined = "".join(processor.format.pieces(turns))
    assert rendered == joined + "\n"
    assert [i for ids, _ in segments for i in ids] == tok(joined, add_special_tokens=False).input_ids
    assert [supervised for _, supervised in segments] == [False, True, False, True]
    assert tok.decode(segments[1][0]) == "a red circle<|im_end|>" and segments[1][0][-1] == processor.tokens.eos
    slot = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(processor.prompts.generation("what is this?")) == slot + "<begin_of_image>"
    assert llm.tokens.eos == tok.convert_tokens_to_ids("<|im_end|>")

    save_family("mistral", tmp_path / "mistral")
    plain = load_llm_from(str(tmp_path / "mistral"))
    processor = UniGenProcessor(plain.tokenizer, unified_config(plain))
    assert plain.prompt_format == "janus-pro"
    reply = processor.prompts.dialogue(["what is this?", "a red circle"])[1][0]
    assert plain.tokenizer.decode(reply) == "a red circle </s>"


# ---- text stays text: a unified model trained around a frozen LLM answers text prompts as the LLM did ------


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 12, seed=3)


@torch.no_grad()
def assert_text_stays_text(hf, final):
    """The trained checkpoint (saved, loaded back) gives the source LLM's logits (<= 1e-5) and 32 greedy tokens
    on text-only prompts built by its own processor (the chat template) and on plain text."""
    model = UniGenModel.from_pretrained(final).eval()
    processor = UniGenProcessor.from_pretrained(final, config=model.config)
    chat = processor.chat_inputs([{"role": "user", "content": "what is in this picture?"}])
    assert chat["pixel_values"] is None
    plain = text_rows(processor, ["a large red circle at the top"])
    for ids, mask in ((chat["input_ids"], chat["attention_mask"]), plain):
        vocab = hf.config.vocab_size
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        assert (model(input_ids=ids, attention_mask=mask).logits[..., :vocab] - ref).abs().max() <= 1e-5
        hf.generation_config.eos_token_id = None
        greedy = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                             pad_token_id=processor.tokens.pad)[:, ids.shape[1]:]
        assert generate_text(model, ids, mask, max_new_tokens=32, eos_token_id=-1) == greedy.tolist()


def test_method_a_stage_one_on_a_frozen_llm_keeps_its_text(shapes_data, tmp_path):
    """`unigen train --config train/shapes.yaml data=... llm_from=PATH`: the Shapes-sized SigLIP and VQ, the LLM's
    sizes, prompts in its chat template; stage I trains the aligners and heads only."""
    from unigen.cli import main

    hf = save_family("qwen2", tmp_path / "llm")
    rc = main(["train", "--config", str(TRAIN / "shapes.yaml"), f"data={shapes_data}", f"llm_from={tmp_path / 'llm'}",
               "--output-dir", str(tmp_path / "run"), "--stage", "1", "stage1.steps=2", "stage1.batch_size=2",
               "tensorboard=false"])
    assert rc == 0
    final = tmp_path / "run" / "stage1" / "final"
    config = UniGenConfig.load(final)
    assert (config.prompt_format, config.llm.hidden_size, config.llm.qkv_bias) == ("chat-template", 64, True)
    assert config.vision.width == UniGenConfig.from_name("shapes").vision.width  # the recipe's own SigLIP
    assert_text_stays_text(hf, final)
    trained = UniGenModel.from_pretrained(final)
    assert trained.aligner.layers[0].weight.shape[0] == 64  # the aligners and heads are sized to the LLM


def test_method_b_on_a_frozen_llm_keeps_its_text(shapes_data, tmp_path):
    """Method B (cross-attention blocks, their gates open) over a frozen Qwen3: text-only prompts are the LLM's."""
    hf = save_family("qwen3", tmp_path / "llm")
    r = load_recipe(TRAIN / "shapes-crossattn.yaml", [f"data={shapes_data}", f"llm_from={tmp_path / 'llm'}",
                                                     f"output_dir={tmp_path / 'run'}", "stage1.steps=2",
                                                     "stage1.batch_size=2", "tensorboard=false"])
    final = run_stage(r, 1, progress=False)
    assert UniGenConfig.load(final).fusion == "cross_attention"
    assert_text_stays_text(hf, final)


# ---- the three keys and the shipped recipes on tiny parts -----------------------------------------------------


@pytest.fixture(scope="module")
def image_parts(tmp_path_factory):
    """A tiny timm SigLIP (Janus's architecture) and a tiny unigen VQ, saved as siglip_from / vq_from read them."""
    import timm
    from timm.models import save_for_hf

    from unigen.config import VQConfig
    from unigen.models.vq import VQModel
    from unigen.training.tokenizer.vq_trainer import save_vq

    torch.manual_seed(0)
    siglip = timm.create_model("vit_large_patch16_siglip_384", pretrained=False, embed_dim=48, depth=2, num_heads=2,
                               img_size=32, patch_size=8).eval()
    siglip_dir = tmp_path_factory.mktemp("siglip")
    save_for_hf(siglip, str(siglip_dir), safe_serialization=True)
    vq = VQModel(VQConfig(image_size=32, codebook_size=48, embed_dim=4, base_channels=32, channel_mult=(1, 1, 2),
                          num_res_blocks=1, z_channels=32)).eval()
    vq_dir = save_vq(vq, tmp_path_factory.mktemp("vq"))
    return siglip, siglip_dir, vq, vq_dir


def test_the_three_keys_build_a_model_sized_to_its_parts(image_parts, shapes_data, tmp_path):
    from unigen.data.manifest import read_samples
    from unigen.training.start import build_fresh

    siglip, siglip_dir, vq, vq_dir = image_parts
    save_family("qwen3", tmp_path / "llm")
    r = load_recipe(TRAIN / "smoke.yaml", [f"data={shapes_data}", f"output_dir={tmp_path / 'run'}",
                                         f"llm_from={tmp_path / 'llm'}", f"siglip_from={siglip_dir}",
                                         f"vq_from={vq_dir}"])
    model, processor = build_fresh(r, read_samples(shapes_data))
    c = model.config
    assert (c.vision.width, c.vq.codebook_size, c.llm.head_dim, c.llm.qk_norm) == (48, 48, 32, True)
    assert model.aligner.layers[0].weight.shape == (64, 48) and model.gen_head.vision_head.weight.shape[0] == 48
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.vision_model(x), siglip.forward_features(x))
        assert torch.equal(model.encode_image_tokens(x), vq.encode(x))
    assert processor.format.adds_bos is False  # the LLM's chat template


def test_janus_pretrained_parts_recipe_runs_its_three_stages(image_parts, shapes_data, tmp_path):
    """Stage I trains only the aligners and heads, II adds the LLM, III the SigLIP encoder; the VQ never trains."""
    from train_common import changed_groups, weights

    _, siglip_dir, _, vq_dir = image_parts
    save_family("llama", tmp_path / "llm")
    steps = [f"stage{n}.{k}" for n in (1, 2, 3) for k in ("steps=1", "batch_size=4", "grad_accum=1",
                                                          "warmup_steps=0", "mixture=[1, 0, 1]")]
    r = load_recipe(TRAIN / "janus-pretrained-parts.yaml", [
        f"data={shapes_data}", f"output_dir={tmp_path / 'run'}", f"llm_from={tmp_path / 'llm'}",
        f"siglip_from={siglip_dir}", f"vq_from={vq_dir}", "bf16=false", "tensorboard=false", *steps])
    finals = [run_stage(r, n, progress=False) for n in (1, 2, 3)]
    heads = {"aligner", "gen_aligner", "gen_embed", "gen_head"}
    for n, expected in ((2, heads | {"llm"}), (3, heads | {"llm", "vision_encoder"})):
        trained, frozen = changed_groups(weights(finals[n - 2]), weights(finals[n - 1]))
        assert trained == expected and "vq" in frozen, n
    assert UniGenConfig.load(finals[2]).vision.width == 48


def test_llama32_vision_recipe_keeps_the_llm_text(image_parts, shapes_data, tmp_path):
    _, siglip_dir, _, vq_dir = image_parts
    hf = save_family("qwen2", tmp_path / "llm")
    steps = [f"stage1.{k}" for k in ("steps=2", "batch_size=2", "grad_accum=1", "warmup_steps=0")]
    r = load_recipe(TRAIN / "llama32-vision.yaml", [
        f"data={shapes_data}", f"output_dir={tmp_path / 'run'}", f"llm_from={tmp_path / 'llm'}",
        f"siglip_from={siglip_dir}", f"vq_from={vq_dir}", "bf16=false", "tensorboard=false",
        "model.cross_attention_every=1", *steps])
    final = run_stage(r, 1, progress=False)
    assert UniGenModel.from_pretrained(final).cross_attn_layers is not None
    assert_text_stays_text(hf, final)


def test_siglip_from_with_the_patch_encoder_is_refused(image_parts, tmp_path):
    from unigen.training.start import load_image_parts

    r = load_recipe(TRAIN / "smoke.yaml", ["data=x.jsonl", f"siglip_from={image_parts[1]}"])
    config = UniGenConfig.from_name("smoke")
    config.encoder = "patch"
    with pytest.raises(ConfigError, match="the recipe's model.encoder is 'patch'; a SigLIP encoder needs encoder"):
        load_image_parts(r, config)


# ---- bad inputs -----------------------------------------------------------------------------------------


def test_an_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        load_llm_from(str(tmp_path))
    assert str(err.value) == (f"llm_from={tmp_path}: architecture GPT2LMHeadModel is not supported; supported: "
                              "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                              "Qwen2MoeForCausalLM, OlmoeForCausalLM, MixtralForCausalLM")


def test_a_hub_id_offline_says_to_download_it_first(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError) as err:
        load_llm_from("nobody-here/no-such-llm")
    message = str(err.value)
    assert "\n" not in message and message.startswith("llm_from=nobody-here/no-such-llm is not a local folder")
    assert "download it first (`hf download nobody-here/no-such-llm --local-dir DIR`)" in message


def test_weights_of_another_vocabulary_name_the_part(tmp_path):
    """A config.json whose vocab_size disagrees with the saved embedding is one line naming llm_from."""
    import json

    save_family("llama", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["vocab_size"] += 7
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load_llm_from(str(tmp_path))
    assert str(err.value).startswith(f"llm_from={tmp_path}: its weights do not load as its config.json describes")
    assert "\n" not in str(err.value)


def test_llm_from_beside_init_from_is_refused(tmp_path):
    from unigen.training.start import start_source

    r = load_recipe(TRAIN / "smoke.yaml", ["data=x.jsonl", f"llm_from={tmp_path}", f"init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="llm_from builds a new model, but init_from starts from"):
        start_source(r, 1, None)
