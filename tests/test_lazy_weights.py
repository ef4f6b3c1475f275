"""Checkpoints read tensor by tensor: the loaded model holds every weight and nothing else is kept alive beside it;
values equal a whole-file read in every layout and dtype; damaged files are named."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import unigen.models.checkpoint as checkpoint
import unigen.models.lazy_weights as lazy_weights
from unigen.errors import CheckpointError
from unigen.models.lazy_weights import bin_tensors, safetensors_tensors
from unigen.models.model import UniGenModel
from unigen.testing import write_official_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_hf_janus):
    return UniGenModel.from_pretrained(tiny_hf_janus[1])


def test_each_weight_is_in_the_model_before_the_next_is_read(tiny_hf_janus, monkeypatch):
    """The peak of a load is the model plus one tensor: when a tensor is read, every earlier one is already the
    model's own (no dict of read tensors waits beside it)."""
    reads = []
    built = {}
    original = checkpoint.materialize
    original_init = UniGenModel.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built["model"] = self

    def counting(value, dtype=None):
        model = built["model"]
        in_model = sum(not t.is_meta for t in model.state_dict().values())
        reads.append(in_model)
        return original(value, dtype)

    monkeypatch.setattr(UniGenModel, "__init__", init)
    monkeypatch.setattr(checkpoint, "materialize", counting)
    loaded = UniGenModel.from_pretrained(tiny_hf_janus[1])  # transformers layout: renamed, fused, cast
    assert reads == list(range(len(reads)))
    assert len(reads) == len(loaded.state_dict())


def test_a_cast_read_goes_through_a_bounded_buffer(tmp_path, monkeypatch):
    torch.manual_seed(0)
    weights = {"a": torch.randn(37, 11), "b": torch.randn(5), "c": torch.randint(0, 9, (6,)), "e": torch.zeros(0)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(lazy_weights, "CAST_CHUNK", 16)  # many chunks, the last one short
    tensors = safetensors_tensors(tmp_path / "w.safetensors")
    for name, value in weights.items():
        assert torch.equal(tensors[name].materialize(), value)
        as_bf16 = tensors[name].materialize(torch.bfloat16)
        assert torch.equal(as_bf16, value.to(torch.bfloat16) if value.is_floating_point() else value)


def test_bin_pages_released_after_a_read_are_read_again_right(tmp_path):
    """Tied weights share one storage in a .bin; releasing the first's pages must not change the second's values,
    nor a second read of the same tensor."""
    torch.manual_seed(0)
    embed = torch.randn(4096, 64)  # 1 MiB: whole pages inside it are released
    torch.save({"embed": embed, "head": embed, "other": torch.randn(3, 3)}, tmp_path / "w.bin")
    tensors = bin_tensors(tmp_path / "w.bin")
    assert tensors["embed"].tensor.untyped_storage().data_ptr() == tensors["head"].tensor.untyped_storage().data_ptr()
    first = tensors["embed"].materialize()
    assert torch.equal(first, embed)
    assert torch.equal(tensors["head"].materialize(), embed)
    assert torch.equal(tensors["embed"].materialize(torch.bfloat16), embed.to(torch.bfloat16))


def test_official_bin_shards_and_bf16_load_equal_a_whole_read(model, tmp_path):
    write_official_layout(model, tmp_path)
    state = {k: v.materialize() for k, v in safetensors_tensors(tmp_path / "model.safetensors").items()}
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2]), 1):  # a fused q|k|v spans both shards
        torch.save({k: state[k] for k in part}, tmp_path / f"pytorch_model-0000{i}-of-00002.bin")
        weight_map.update({k: f"pytorch_model-0000{i}-of-00002.bin" for k in part})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for dtype in (torch.float32, torch.bfloat16):
        loaded = UniGenModel.from_pretrained(tmp_path, dtype=dtype)
        for name, value in model.state_dict().items():
            want = value.to(dtype) if value.is_floating_point() else value
            assert torch.equal(loaded.state_dict()[name], want), name


def test_a_header_past_the_end_of_the_file_is_named(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    with pytest.raises(CheckpointError, match=r"tensor 'w' does not fit the file.*truncated or damaged"):
        safetensors_tensors(tmp_path / "model.safetensors")
    header = json.dumps({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(CheckpointError, match="bad header entry"):
        safetensors_tensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="a header of"):
        safetensors_tensors(tmp_path / "model.safetensors")


@pytest.mark.slow
def test_a_janus_pro_7b_shaped_bin_checkpoint_loads_within_1_3x_its_bf16_bytes(tmp_path):
    """Janus-Pro-7B's shape as DeepSeek ships it (pickled .bin shards of bf16, about 14 GiB), loaded into bf16:
    the process's peak resident memory grows by at most 1.3x the weights (benchmarks/bench_load.py)."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_load.py"), "--layout", "official-bin",
                           "--shape", "7b", "--save-dtype", "bfloat16", "--dtype", "bfloat16", "--work",
                           str(tmp_path)], check=True, capture_output=True, text=True, timeout=3000)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["parameters"] > 6.5e9
    assert result["ratio"] <= 1.3, result
