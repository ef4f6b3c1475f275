"""Trained text tokenizers: Janus specials, BOS, offline AutoTokenizer round trip, clear errors."""

import pytest
import torch

from unigen.testing import TINY_TOKENS
from unigen.text_tokenizer import SPECIALS, special_token_ids, tiny_tokenizer, train_text_tokenizer

torch.set_num_threads(1)

TEXTS = ["a large red circle at the top left", "a small cyan diamond at the center"] * 5


def load_offline(directory, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_trained_tokenizer_round_trips_through_autotokenizer(kind, tmp_path, monkeypatch):
    trained = train_text_tokenizer(TEXTS, tmp_path, vocab_size=300, kind=kind)
    tok = load_offline(tmp_path, monkeypatch)
    ids = special_token_ids(tok)
    assert ids == special_token_ids(trained) == TINY_TOKENS
    assert tok.padding_side == "left"
    enc = tok("<|User|>: a large red circle.<begin_of_image>").input_ids
    assert enc[0] == ids.bos and enc.count(ids.bos) == 1 and enc[-1] == ids.image_start
    assert enc == trained("<|User|>: a large red circle.<begin_of_image>").input_ids
    assert tok("<|Assistant|>", add_special_tokens=False).input_ids == [tok.get_vocab()["<|Assistant|>"]]
    assert "a large red circle" in tok.decode(enc, skip_special_tokens=True)
    if kind == "wordlevel":  # every caption word is one token
        assert len(tok("a large red circle at the top left", add_special_tokens=False).input_ids) == 8


def test_bpe_round_trips_any_text_exactly(tmp_path, monkeypatch):
    tiny_tokenizer(tmp_path)
    tok = load_offline(tmp_path, monkeypatch)
    text = "<|User|>: a zebra? ünïcode ☃\n\n<|Assistant|>: ok<｜end▁of▁sentence｜>"
    ids = tok(text).input_ids
    assert tok.decode(ids[1:]) == text  # everything after the BOS
    assert tok.decode(ids, skip_special_tokens=True) == ": a zebra? ünïcode ☃\n\n: ok"


def test_tiny_tokenizer_has_janus_specials_at_the_tiny_ids(tmp_path):
    tok = tiny_tokenizer(tmp_path, vocab_size=400)
    assert 300 <= len(tok) <= 400
    assert [tok.get_vocab()[s] for s in SPECIALS] == list(range(len(SPECIALS)))
    assert special_token_ids(tok) == TINY_TOKENS
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()


def test_missing_special_tokens_are_named(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<｜begin▁of▁sentence｜>": 1, "<｜end▁of▁sentence｜>": 2, "a": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")))
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \['<｜▁pad▁｜>', '<begin_of_image>', "
                                         r"'<end_of_image>', '<image_placeholder>', 'a pad token"):
        special_token_ids(tok)


def test_unknown_kind_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'sentencepiece'; known: \['bpe', 'wordlevel'\]"):
        train_text_tokenizer(TEXTS, tmp_path, kind="sentencepiece")
