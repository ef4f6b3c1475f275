"""Saving and loading: exact round trips, shards, pickled .bin shards, and errors that name the problem."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from unigen import UniGenModel
from unigen.models.checkpoint import CheckpointError, official_state_dict
from unigen.testing import write_official_layout


@pytest.fixture(scope="module")
def model(tiny_hf_janus):
    return UniGenModel.from_pretrained(tiny_hf_janus[1])


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "unigen"
    again = UniGenModel.from_pretrained(tmp_path)
    assert again.config == model.config
    assert_same_weights(model, again)


def test_sharded_save_load(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    on_disk = official_state_dict(model.state_dict(), model.config.llm)
    assert set(index["weight_map"]) == set(on_disk)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    assert_same_weights(model, UniGenModel.from_pretrained(tmp_path))
    # re-saving unsharded leaves no stale shards behind
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("model-*.safetensors"))
    assert_same_weights(model, UniGenModel.from_pretrained(tmp_path))


def test_files_hold_deepseeks_key_names(model, tmp_path):
    """In memory q|k|v and gate|up are fused; on disk they are DeepSeek's separate projections."""
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    llm = model.config.llm
    for i in range(llm.num_layers):
        block = f"language_model.model.layers.{i}"
        names = [f"{block}.self_attn.{p}_proj.weight" for p in "qkvo"] + [
            f"{block}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        assert set(names) <= keys
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)
    state = load_file(str(tmp_path / "model.safetensors"))
    fused = model.language_model.model.layers[0].self_attn.qkv_proj.weight
    q = state["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(fused[: q.shape[0]], q)


def test_load_in_bfloat16(model, tmp_path):
    model.save_pretrained(tmp_path)
    half = UniGenModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def split_bin_shards(directory, state):
    """DeepSeek's Janus-Pro-7B layout: pickled .bin shards plus an index."""
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_official_layout_with_pickled_bin_shards(model, tmp_path):
    write_official_layout(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    split_bin_shards(tmp_path, state)
    assert_same_weights(model, UniGenModel.from_pretrained(tmp_path))


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bin_with_code_is_refused(model, tmp_path):
    write_official_layout(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Exploit()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        UniGenModel.from_pretrained(tmp_path)


def test_directory_of_no_known_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"no config.json.*notes.txt"):
        UniGenModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 3}))
    with pytest.raises(CheckpointError, match=r"model_type='bert'"):
        UniGenModel.from_pretrained(tmp_path)


def test_missing_path_and_offline_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UniGenModel.from_pretrained(tmp_path / "nope" / "deeper")
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        UniGenModel.from_pretrained("unigen-test-owner/no-such-model-here")


def test_config_without_weights(model, tmp_path):
    model.config.save(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        UniGenModel.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_listed(model, tmp_path):
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("gen_head.vision_head.bias")
    state["gen_head.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        UniGenModel.from_pretrained(tmp_path)
    assert "missing keys (1): ['gen_head.vision_head.bias']" in str(err.value)
    assert "unexpected keys (1): ['gen_head.extra.weight']" in str(err.value)


def test_shape_disagreeing_with_config(model, tmp_path):
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["vq"]["codebook_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"gen_embed.weight: checkpoint \(64, 8\) vs config \(32, 8\)"):
        UniGenModel.from_pretrained(tmp_path)


def test_unknown_config_key(model, tmp_path):
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["llm"]["hidden_sise"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"unknown key\(s\) in config.llm: \['hidden_sise'\]"):
        UniGenModel.from_pretrained(tmp_path)


def test_wrong_pixel_shapes(model):
    ids = torch.tensor([[1, 4] + [6] * 16 + [5]])
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(n_images, 3, 32, 32\); got \(1, 3, 64, 64\)"):
        model(ids, pixel_values=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="2 image\\(s\\) give 32 feature vectors .* 16 image placeholder"):
        model(ids, pixel_values=torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)
    with pytest.raises(ValueError, match=r"VQ pixels must have shape \(batch, 3, 16, 16\)"):
        model.encode_image_tokens(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"image codes must lie in \[0, 64\)"):
        model.decode_image_tokens(torch.full((1, 16), 64))


def test_official_config_uses_llama_defaults_for_missing_width(tmp_path):
    """Janus-Pro-7B's language_config names only the layer count; the width is LlamaConfig's default."""
    from unigen.models.checkpoint import config_from_official

    raw = {
        "language_config": {"model_type": "llama", "num_hidden_layers": 30, "vocab_size": 102400,
                            "max_position_embeddings": 16384, "torch_dtype": "bfloat16"},
        "vision_config": {"cls": "CLIPVisionTower", "params": {"image_size": 384, "model_name":
                          "siglip_large_patch16_384", "select_feature": "same", "select_layer": -1}},
        "aligner_config": {"params": {"depth": 2, "input_dim": 1024, "n_embed": 4096}},
        "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": 16384, "n_embed": 8}},
        "gen_aligner_config": {"params": {"depth": 2, "input_dim": 8, "n_embed": 4096}},
        "gen_head_config": {"params": {"image_token_embed": 4096, "image_token_size": 16384, "n_embed": 4096}},
    }
    cfg = config_from_official(raw)
    assert (cfg.llm.hidden_size, cfg.llm.intermediate_size, cfg.llm.num_heads, cfg.llm.num_layers) == (
        4096, 11008, 32, 30)
    assert (cfg.vision.width, cfg.vision.depth, cfg.vq.num_tokens) == (1024, 24, 576)
    with torch.device("meta"):
        n = UniGenModel(cfg).num_parameters()
    assert 7.3e9 < n < 7.5e9  # 7.42B per the reference table


def test_token_ids_come_from_the_tokenizer_or_the_transformers_configs(tiny_hf_janus, tmp_path):
    import shutil

    from unigen.testing import TINY_TOKENS

    _, directory = tiny_hf_janus
    assert UniGenModel.from_pretrained(directory).config.tokens == TINY_TOKENS  # read from the tokenizer
    shutil.copytree(directory, tmp_path / "no_tokenizer")
    for path in (tmp_path / "no_tokenizer").glob("*token*"):
        path.unlink()
    tokens = UniGenModel.from_pretrained(tmp_path / "no_tokenizer").config.tokens
    # text_config gives bos/eos/pad; generation_config gives the CFG pad and <begin_of_image>
    assert (tokens.bos, tokens.eos, tokens.pad, tokens.cfg_pad, tokens.image_start, tokens.image) == (
        TINY_TOKENS.bos, TINY_TOKENS.eos, TINY_TOKENS.pad, TINY_TOKENS.cfg_pad, TINY_TOKENS.image_start,
        TINY_TOKENS.image)
