"""Peak memory and time of ``UniGenModel.from_pretrained`` for each checkpoint layout, against the loaded weights.

    python benchmarks/bench_load.py --layout all --shape 1b --dtype float32 --work /tmp/load   # Janus-Pro-1B shape
    python benchmarks/bench_load.py --layout official-bin --shape 7b --save-dtype bfloat16 --dtype bfloat16 --work DIR

Each layout is written once with random weights (``--work/LAYOUT-SHAPE-SAVEDTYPE``, kept for the next run), then
loaded in a fresh process that reports the growth of its peak resident memory (``ru_maxrss``) over what it held
before the load, divided by the bytes of the loaded model's weights: 1.0 is the weights alone; a loader that holds
the file's tensors beside their cast copies shows 2 or more. The layouts are unigen's own (one safetensors file,
fused q|k|v), transformers' Janus (renamed keys, split q/k/v fused at load, tied head) and DeepSeek's official
layout as pickled ``.bin`` shards (Janus-Pro-7B's files). Shapes: ``test`` (about 100 MB, the default test's),
``1b`` (Janus-Pro-1B: 2.08 B parameters), ``7b`` (Janus-Pro-7B's LLM, 4096 wide, 30 layers).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

LAYOUTS = ("unigen", "transformers", "official-bin")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LLM_SHAPES = {  # (width, layers, heads, mlp, vocab)
    "test": (512, 4, 8, 1408, 16384),
    "1b": (2048, 24, 16, 5632, 102400),
    "7b": (4096, 30, 32, 11008, 102400),
}
BIN_SHARD_BYTES = 10 << 30  # Janus-Pro-7B's first .bin shard is about 10 GB


def janus_config(shape: str):
    """A transformers ``JanusConfig``: the LLM of ``shape``; SigLIP-L and the VQ of Janus at 1b / 7b, small ones
    for ``test``."""
    from transformers import JanusConfig, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    width, layers, heads, mlp, vocab = LLM_SHAPES[shape]
    text = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       tie_word_embeddings=False)
    if shape == "test":
        vision = JanusVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                   patch_size=16, projection_dim=width, depth=2, num_image_tokens=16)
        vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=1024, latent_channels=32, base_channels=32,
                              channel_multiplier=[1, 1, 2], num_res_blocks=1, projection_dim=width,
                              image_token_embed_dim=width, num_hidden_layers=2)
    else:
        vision = JanusVisionConfig(projection_dim=width)
        vq = JanusVQVAEConfig(projection_dim=width, image_token_embed_dim=width)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=False)


def _random(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=gen)


def _random_weights(model: torch.nn.Module, dtype: torch.dtype, gen: torch.Generator) -> torch.nn.Module:
    """A model built on the meta device, in memory with random weights of ``dtype``."""
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_random(p.shape, dtype, gen))
    return model


def write(layout: str, shape: str, save_dtype: torch.dtype, out: Path) -> None:
    """The checkpoint of ``layout`` and ``shape``, random weights in ``save_dtype``; at most one copy of the
    weights in memory (the official layout's ``.bin`` shards one shard at a time)."""
    from transformers import JanusForConditionalGeneration

    from unigen.models.checkpoint import config_from_transformers, official_state_dict
    from unigen.models.model import UniGenModel
    from unigen.testing import official_config, write_tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    hf_config = janus_config(shape)
    vocab = hf_config.text_config.vocab_size
    if layout == "transformers":
        with torch.device("meta"):
            model = JanusForConditionalGeneration(hf_config)
        model = _random_weights(model, save_dtype, gen)
        model.save_pretrained(out)
        write_tiny_tokenizer(out, vocab)
        return
    config = config_from_transformers(hf_config.to_dict())
    with torch.device("meta"):
        model = UniGenModel(config)
    if layout == "unigen":
        model = _random_weights(model, save_dtype, gen)
        model.save_pretrained(out, max_shard_bytes=64 << 30)  # one file: the case a whole-file read hurts most
        write_tiny_tokenizer(out, vocab)
        return
    # DeepSeek's layout as pickled .bin shards (Janus-Pro-7B's files): names and shapes from the model on meta
    (out / "config.json").write_text(json.dumps(official_config(config), indent=2))
    write_tiny_tokenizer(out, vocab)
    names = official_state_dict(model.state_dict(), config.llm)
    shards, current, size = [], [], 0
    for key in sorted(names):
        nbytes = names[key].numel() * save_dtype.itemsize
        if current and size + nbytes > BIN_SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: _random(names[k].shape, save_dtype, gen) for k in keys}, out / name)
        weight_map.update({k: name for k in keys})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def load(directory: Path, dtype: torch.dtype) -> dict:
    """Load once in this process: peak-RSS growth, the weights' bytes and seconds."""
    from unigen.models.checkpoint import load_config
    from unigen.models.model import UniGenModel

    load_config(directory)  # the config and tokenizer readers' imports and caches: not the weights' memory
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    model = UniGenModel.from_pretrained(directory, dtype=dtype)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {"weights_bytes": weights, "peak_growth_bytes": peak - before, "ratio": (peak - before) / weights,
            "seconds": seconds, "parameters": sum(p.numel() for p in model.parameters())}


def measure(layout: str, shape: str, save_dtype: str, dtype: str, work: Path) -> dict:
    directory = work / f"{layout}-{shape}-{save_dtype}"
    if not (directory / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--write", str(directory), "--layout", layout, "--shape", shape,
                        "--save-dtype", save_dtype], check=True)
    done = subprocess.run([sys.executable, __file__, "--load", str(directory), "--dtype", dtype], check=True,
                          capture_output=True, text=True)
    return {"layout": layout, "shape": shape, "file_dtype": save_dtype, "dtype": dtype,
            **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=(*LAYOUTS, "all"), default="all")
    p.add_argument("--shape", choices=tuple(LLM_SHAPES), default="test")
    p.add_argument("--save-dtype", choices=tuple(DTYPES), default="float32", help="the files' dtype")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="the dtype loaded into")
    p.add_argument("--work", type=Path, help="where the checkpoints are written (and kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # the child processes' entry points
    p.add_argument("--load", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.write:
        write(args.layout, args.shape, DTYPES[args.save_dtype], args.write)
        return
    if args.load:
        print(json.dumps(load(args.load, DTYPES[args.dtype])))
        return
    if args.work is None:
        p.error("--work DIR is needed: the checkpoints are written there")
    layouts = LAYOUTS if args.layout == "all" else (args.layout,)
    print("| layout | file dtype | loaded as | weights | peak growth | ratio | seconds |")
    print("|---|---|---|---:|---:|---:|---:|")
    for layout in layouts:
        r = measure(layout, args.shape, args.save_dtype, args.dtype, args.work)
        print(f"| {layout} | {r['file_dtype']} | {r['dtype']} | {r['weights_bytes'] / 2**30:.2f} GiB | "
              f"{r['peak_growth_bytes'] / 2**30:.2f} GiB | {r['ratio']:.2f} | {r['seconds']:.1f} |", flush=True)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
