"""Train a text tokenizer for our own models with Hugging Face ``tokenizers``.

The result is saved with ``PreTrainedTokenizerFast.save_pretrained`` so ``AutoTokenizer`` loads it
from a checkpoint directory like any other, and it carries Janus's special tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from unigen.config import TokenIds

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<pad>"
PROMPT_PUNCTUATION = ": . , ? ! ' \" ( ) -"
SPECIALS = [PAD, BOS, EOS, "<｜▁pad▁｜>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>",
            "<|User|>", "<|Assistant|>"]


def train_text_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000,
                         kind: str = "bpe"):
    """``kind="bpe"``: byte-level BPE for open text; ``"wordlevel"``: one id per word, for closed worlds
    such as Shapes, where every caption word should be a single token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + ["<unk>"])
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'bpe' or 'wordlevel'")
    # prompt templates use these even when the corpus (captions) does not
    tok.train_from_iterator(itertools.chain(texts, [PROMPT_PUNCTUATION]), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token="<unk>" if kind == "wordlevel" else None,
                                   additional_special_tokens=SPECIALS[3:])
    fast.padding_side = "left"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def special_token_ids(tokenizer) -> TokenIds:
    """The Janus special ids of a tokenizer; names any that it lacks."""
    vocab = tokenizer.get_vocab()
    names = {"bos": BOS, "eos": EOS, "cfg_pad": "<｜▁pad▁｜>", "image_start": "<begin_of_image>",
             "image_end": "<end_of_image>", "image": "<image_placeholder>"}
    missing = [text for text in names.values() if text not in vocab]
    if missing or tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer lacks special tokens {missing or ['a pad token']}")
    return TokenIds(pad=tokenizer.pad_token_id, **{k: vocab[v] for k, v in names.items()})
