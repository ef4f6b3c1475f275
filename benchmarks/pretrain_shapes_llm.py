"""Pretrain a small text-only Llama on Shapes captions: the pretrained LLM of a Shapes run from parts (issue 36).

    python benchmarks/pretrain_shapes_llm.py --data DIR/train.jsonl --out runs/shapes-llm [--steps 600] [--threads 1]
    unigen train --config train/shapes-from-parts.yaml data=DIR/train.jsonl llm_from=runs/shapes-llm ...

The tokenizer is the one ``unigen train`` trains for the same recipe and data (word level, over the data's text
and the prompt's words), so a run from this LLM and a run from scratch read the same token ids. The model is the
recipe's ``model.llm`` as a transformers ``LlamaForCausalLM`` (untied head, as unigen's decoder). The text is the
canonical captions of the Shapes world's own random specs (``sample_specs``, not the data's lines), each document
``BOS caption EOS``, packed into rows as in LM pretraining. It is saved with ``save_pretrained`` and its tokenizer,
plus ``pretrain.json``: the losses, the wall and CPU seconds, and the held-out nats per caption against the
world's floor ln(576) (every spec equally likely). One thread and one seed give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import torch

from unigen.config import UniGenConfig
from unigen.data.manifest import read_samples
from unigen.shapes.world import all_combinations, caption, sample_specs
from unigen.training.recipe import load_recipe
from unigen.training.start import train_word_tokenizer


def recipe_tokenizer(config_path: str, data: str, overrides: list[str]):
    """The word-level tokenizer and the model config ``unigen train --config CONFIG data=DATA`` would build."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(config_path, [f"data={data}", f"output_dir={tmp}", *overrides])
        config = UniGenConfig.from_dict(recipe.model)
        tokenizer = train_word_tokenizer(recipe, read_samples(data), config)
    return tokenizer, config


def llama_for(config: UniGenConfig):
    """A fresh ``LlamaForCausalLM`` of the unified model's decoder sizes (``load_llm_from`` maps it back exactly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = config.llm
    hf = LlamaConfig(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                     num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
                     num_key_value_heads=llm.num_kv_heads, max_position_embeddings=llm.max_position_embeddings,
                     rms_norm_eps=llm.rms_norm_eps, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
                     bos_token_id=config.tokens.bos, eos_token_id=config.tokens.eos, pad_token_id=config.tokens.pad)
    return LlamaForCausalLM(hf)


def caption_documents(tokenizer, n: int, seed: int) -> list[list[int]]:
    """``n`` documents ``BOS caption EOS`` of specs drawn uniformly with ``seed``."""
    ids = tokenizer([caption(s) for s in sample_specs(n, seed)], add_special_tokens=True)["input_ids"]
    return [row + [tokenizer.eos_token_id] for row in ids]


def packed_rows(documents: list[list[int]], seq_len: int) -> torch.Tensor:
    """The documents end to end, cut into rows of ``seq_len`` tokens (the tail that fills no row is dropped)."""
    stream = torch.tensor([t for d in documents for t in d], dtype=torch.long)
    rows = len(stream) // seq_len
    return stream[: rows * seq_len].view(rows, seq_len)


@torch.no_grad()
def nats_per_caption(model, tokenizer, seed: int, n: int = 576) -> float:
    """Mean negative log-likelihood (nats) of a held-out caption and its EOS, each document on its own after BOS.
    A model that knows the world's language and nothing more reaches ln(576) = 6.36: the specs are uniform."""
    model.eval()
    by_length: dict[int, list[list[int]]] = {}
    for doc in caption_documents(tokenizer, n, seed):  # equal lengths batch without padding
        by_length.setdefault(len(doc), []).append(doc)
    total = 0.0
    for docs in by_length.values():
        x = torch.tensor(docs)
        logp = model(x).logits[:, :-1].log_softmax(-1)
        total -= logp.gather(2, x[:, 1:, None]).sum().item()
    model.train()
    return total / n


def lr_at(step: int, args) -> float:
    """Linear warmup, then a cosine down to a tenth (the stages' schedule)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, rows: torch.Tensor, args) -> list[float]:
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))
    losses = []
    model.train()
    for step in (bar := tqdm(range(args.steps), desc="pretrain LLM", unit="step")):
        picks = order[(step * args.batch_size + torch.arange(args.batch_size)) % len(rows)]
        batch = rows[picks]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the manifest the unified model trains on (its text words)")
    ap.add_argument("--out", required=True, help="the LLM folder to write (llm_from=OUT)")
    ap.add_argument("--config", default="train/shapes-from-parts.yaml", help="the recipe whose tokenizer and LLM")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--documents", type=int, default=30000, help="captions in the pretraining text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the recipe (model.llm.num_layers=2, ...)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), cpu_seconds()
    tokenizer, config = recipe_tokenizer(args.config, args.data, args.overrides)
    torch.manual_seed(args.seed)
    model = llama_for(config)
    rows = packed_rows(caption_documents(tokenizer, args.documents, args.seed), args.seq_len)
    held_out_seed = args.seed + 1_000_003  # another draw of specs than the training text's
    before = nats_per_caption(model, tokenizer, held_out_seed)
    losses = pretrain(model, rows, args)
    after = nats_per_caption(model, tokenizer, held_out_seed)
    out = Path(args.out)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    result = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
              "documents": args.documents, "seed": args.seed, "threads": args.threads,
              "parameters": sum(p.numel() for p in model.parameters()),
              "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
              "held_out_nats_per_caption": {"before": round(before, 3), "after": round(after, 3),
                                            "floor": round(math.log(len(all_combinations())), 3)},
              "wall_seconds": round(time.perf_counter() - wall, 1), "cpu_seconds": round(cpu_seconds() - cpu, 1)}
    (out / "pretrain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
