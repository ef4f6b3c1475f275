"""Conversations: multi-turn, multi-image prompts in DeepSeek's format (Janus and Janus-Pro), pipe.chat,
`unigen chat`, and the errors of bad messages."""

import io

import pytest
import torch
from PIL import Image

from unigen.cli import main
from unigen.config import TokenIds, UniGenConfig
from unigen.errors import ArgumentError
from unigen.generation.pipeline import UniGenPipeline
from unigen.generation.sampling import generate_text
from unigen.processor import JANUS_SYSTEM_PROMPT, UniGenProcessor

RED, BLUE = Image.new("RGB", (20, 20), (220, 40, 40)), Image.new("RGB", (12, 20), (40, 80, 220))
CONVERSATION = [
    {"role": "user", "content": "<image_placeholder> is Figure 1.\n<image_placeholder> is Figure 2.\nWhich is red?",
     "images": [RED, BLUE]},
    {"role": "assistant", "content": "Figure 1."},
    {"role": "user", "content": " And the other one? "},
]


def deepseek_prompt(user: str, assistant: str, system: str, contents: list[str]) -> str:
    """DeepSeek's VLChatProcessor.apply_sft_template_for_multi_turn_prompts with the "deepseek" template
    (janus/utils/conversation.py, SeparatorStyle.DeepSeek), written out: the reply slot is an empty
    assistant message, each message is stripped, the whole prompt too."""
    seps = ["\n\n", "<｜end▁of▁sentence｜>"]
    out = system + seps[0] if system else ""
    for i, message in enumerate([c.strip() for c in contents] + [""]):
        role = (user, assistant)[i % 2]
        out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return out.strip()


def deepseek_ids(processor, text: str, per_image: int) -> list[int]:
    """tokenizer.encode (BOS first), then add_image_token: each tag -> boi + placeholders + eoi."""
    t = processor.tokens
    ids = [t.bos, *processor.tokenizer(text, add_special_tokens=False).input_ids]
    out = []
    for i in ids:
        out += [t.image_start, *[t.image] * per_image, t.image_end] if i == t.image else [i]
    return out


@pytest.fixture(scope="module")
def pipe(tiny_hf_janus):
    return UniGenPipeline.from_pretrained(tiny_hf_janus[1])


@pytest.mark.parametrize(("fmt", "user", "assistant"), [("janus-pro", "<|User|>", "<|Assistant|>"),
                                                         ("janus", "User", "Assistant")])
@pytest.mark.parametrize("system", [None, ""])
def test_two_image_two_turn_conversation_has_deepseeks_ids(pipe, fmt, user, assistant, system):
    config = UniGenConfig.from_dict({**pipe.model.config.to_dict(), "prompt_format": fmt, "system_prompt": system})
    processor = UniGenProcessor(pipe.processor.tokenizer, config)
    batch = processor.chat_inputs(CONVERSATION)
    text = deepseek_prompt(user, assistant, JANUS_SYSTEM_PROMPT if system is None else system,
                           [m["content"] for m in CONVERSATION])
    per_image = config.image_placeholders_per_image
    assert batch["input_ids"][0].tolist() == deepseek_ids(processor, text, per_image)
    assert batch["attention_mask"].all()
    assert torch.equal(batch["pixel_values"], processor.understanding_pixels([RED, BLUE]))
    if fmt == "janus-pro" and system == "":
        # what transformers' JanusProcessor chat template renders for the same turns (it never adds the system
        # prompt): the official form, written out
        assert text == ("<|User|>: <image_placeholder> is Figure 1.\n<image_placeholder> is Figure 2.\nWhich is red?"
                        "\n\n<|Assistant|>: Figure 1.<｜end▁of▁sentence｜><|User|>: And the other one?\n\n"
                        "<|Assistant|>:")


def test_conversation_ids_with_janus_token_ids():
    """The reference doc's ids (BOS 100000, EOS 100001, <begin_of_image> 100016, <image_placeholder> 100581,
    <end_of_image> 100593), 576 placeholders per 384-px image, Janus-Pro roles, no system prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"<｜begin▁of▁sentence｜>": 100000, "<｜end▁of▁sentence｜>": 100001, "<｜▁pad▁｜>": 100015,
                "<begin_of_image>": 100016, "<image_placeholder>": 100581, "<end_of_image>": 100593,
                "<|User|>": 100588, "<|Assistant|>": 100589}
    words = {"<unk>": 0, ":": 25, "?": 30, "which": 1001, "is": 1002, "red": 1003, "it": 1004}
    tok = Tokenizer(models.WordLevel({**words, **specials}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", additional_special_tokens=list(specials))
    processor = UniGenProcessor(fast, UniGenConfig(tokens=TokenIds(), system_prompt=""))
    messages = [{"role": "user", "content": "which is red?", "images": [RED, BLUE]},
                {"role": "assistant", "content": "it"}, {"role": "user", "content": "red?"}]
    image = [100016, *[100581] * 576, 100593]
    expected = [100000, 100588, 25, *image, *image, 1001, 1002, 1003, 30, 100589, 25, 1004, 100001,
                100588, 25, 1003, 30, 100589, 25]
    assert processor.chat_inputs(messages)["input_ids"][0].tolist() == expected


def test_chat_is_generate_text_on_the_conversation(pipe):
    batch = pipe.processor.chat_inputs(CONVERSATION)
    ids = generate_text(pipe.model, batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                        max_new_tokens=5)[0]
    reply = pipe.chat(CONVERSATION, max_new_tokens=5)
    assert isinstance(reply, str) and reply == pipe.processor.decode(ids)
    # images without tags go in front of the text, one tag and a newline each
    untagged = [{"role": "user", "content": "Which is red?", "images": [RED, BLUE]}]
    tagged = [{"role": "user", "content": "<image_placeholder>\n<image_placeholder>\nWhich is red?",
               "images": [RED, BLUE]}]
    ids = lambda messages: pipe.processor.chat_inputs(messages)["input_ids"]
    assert torch.equal(ids(untagged), ids(tagged))
    text_only = pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert isinstance(text_only, str)


@pytest.mark.parametrize(("messages", "message"), [
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}, {"role": "user", "content": "c"}],
     r"message 2 has role 'robot'; the roles are \['user', 'assistant'\]"),
    ([{"role": "user", "content": "<image_placeholder> what?", "images": [RED, BLUE]}],
     r"message 1 has 1 <image_placeholder> tag\(s\) but 2 image\(s\)"),
    ([{"role": "user", "content": "<image_placeholder> <image_placeholder>", "images": [RED]}],
     r"message 1 has 2 <image_placeholder> tag\(s\) but 1 image\(s\)"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     r"the last message \(message 2\) is the assistant's"),
    ([{"role": "assistant", "content": "a"}], r"message 1 has role 'assistant' where the conversation needs 'user'"),
    ([{"role": "user", "content": "  "}], r"message 1 \(user\) is empty"),
    ([{"role": "user", "content": "a", "image": [RED]}], r"message 1 has unknown key\(s\) \['image'\]"),
    ([], "messages must be a non-empty list"),
    ("hello", "messages must be a non-empty list"),
])
def test_bad_messages_are_named(pipe, messages, message):
    with pytest.raises(ArgumentError, match=message):
        pipe.chat(messages)


def test_cli_chat_attaches_images_resets_and_quits_at_end_of_input(tiny_hf_janus, tmp_path, capsys, monkeypatch):
    RED.save(tmp_path / "red.png")
    lines = [f"/image {tmp_path / 'red.png'}", "what is it?", "/image nowhere.png", "and now?", "/reset", "hi", "/x"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(tiny_hf_janus[1]), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    replies = [line for line in out.split("you> ") if line.startswith("assistant> ")]
    assert len(replies) == 3
    assert "nowhere.png does not exist" in err and "(conversation cleared)" in err and "unknown command '/x'" in err
    pipe = UniGenPipeline.from_pretrained(tiny_hf_janus[1])
    first = pipe.chat([{"role": "user", "content": "what is it?", "images": [str(tmp_path / "red.png")]}],
                      max_new_tokens=3)
    assert replies[0].strip() == f"assistant> {first}".strip()
