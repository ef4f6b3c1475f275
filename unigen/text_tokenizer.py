"""Train a text tokenizer for our own models with Hugging Face ``tokenizers``.

The result is saved with ``PreTrainedTokenizerFast.save_pretrained`` so ``AutoTokenizer`` loads it
from a checkpoint directory like any other (offline), prepends BOS, and carries Janus's special tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from unigen.config import SPECIAL_TOKEN_TEXT, TokenIds

BOS, EOS = SPECIAL_TOKEN_TEXT["bos"], SPECIAL_TOKEN_TEXT["eos"]
PAD = "<pad>"  # the pad token of the tokenizers trained here (Janus's is read from its tokenizer)
ROLE_TOKENS = ["<|User|>", "<|Assistant|>"]
# ids 0..8 in this order, so tiny tokenizers share unigen.testing.TINY_TOKENS' special ids
SPECIALS = [PAD, *(SPECIAL_TOKEN_TEXT[k] for k in ("bos", "eos", "cfg_pad", "image_start", "image_end", "image")),
            *ROLE_TOKENS]
PROMPT_PUNCTUATION = ": . , ? ! ' \" ( ) -"
BOX_WORDS = "[ ] 0 1 2 3 4 5 6 7 8 9"  # a word-level tokenizer splits numbers into digits: boxes never <unk>
KINDS = ("bpe", "wordlevel")

TINY_SENTENCES = (
    "a large red circle at the top left",
    "a small blue square at the bottom right",
    "a green triangle in the center of the image",
    "What is in this picture? Describe the image.",
    "There are two yellow diamonds and one purple circle.",
    "A cat sits on the house under the sun and the moon.",
    "You are a helpful language and vision assistant.",
)


def train_text_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000, kind: str = "bpe"):
    """Train, save to ``out_dir`` and return a ``PreTrainedTokenizerFast`` (left padding, BOS prepended).

    ``kind="bpe"``: byte-level BPE for open text (round-trips any string); ``"wordlevel"``: one id per
    word, for closed worlds such as Shapes, where every caption word should be a single token (it drops
    newlines and maps unseen words to ``<unk>``; numbers are split into digits, each a word it always knows, so
    that any box ``[x1, y1, x2, y2]`` is written and read back: decoded, a number's digits come out space-separated,
    which ``unigen.shapes.boxes.parse_box`` reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + ["<unk>"],
                                            show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {list(KINDS)}")
    # prompt templates and boxes use these even when the corpus (captions) does not
    always = [PROMPT_PUNCTUATION] + ([BOX_WORDS] if kind == "wordlevel" else [])  # byte-level BPE has them all
    tok.train_from_iterator(itertools.chain(texts, always), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token="<unk>" if kind == "wordlevel" else None,
                                   additional_special_tokens=SPECIALS[3:], padding_side="left")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_tokenizer(out_dir: str | Path, vocab_size: int = 400, kind: str = "bpe"):
    """A tokenizer trained on a few built-in sentences, for tests; special ids equal ``TINY_TOKENS``."""
    return train_text_tokenizer(TINY_SENTENCES, out_dir, vocab_size=vocab_size, kind=kind)


def special_token_ids(tokenizer) -> TokenIds:
    """The Janus special ids of a tokenizer, read from its vocabulary; names any that it lacks."""
    vocab = tokenizer.get_vocab()
    missing = [text for text in SPECIAL_TOKEN_TEXT.values() if text not in vocab]
    if tokenizer.pad_token_id is None:
        missing.append("a pad token (tokenizer.pad_token)")
    if missing:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name} lacks the special token(s) {missing}; a unified model needs all of "
                         f"{list(SPECIAL_TOKEN_TEXT.values())} and a pad token (train_text_tokenizer adds them)")
    return TokenIds(pad=tokenizer.pad_token_id, **{k: vocab[v] for k, v in SPECIAL_TOKEN_TEXT.items()})
