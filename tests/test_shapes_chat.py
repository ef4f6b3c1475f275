"""Shapes conversations: phrasings kept apart, training lines that the trainer reads as multi-image rows, the turn
judge, and ``--task chat`` end to end."""

import json
import re

import numpy as np
import pytest
from train_common import recipe

from unigen.data.manifest import ManifestError, read_samples
from unigen.generation.pipeline import UniGenPipeline
from unigen.shapes import write_dataset
from unigen.shapes.chat_eval import carried_over, evaluate_chat, judge_turn, score_turns
from unigen.shapes.checker import check
from unigen.shapes.conversations import (
    HELD_OUT,
    KINDS,
    NOISE_WORD,
    TRAINING,
    conversation_rng,
    draw_conversation,
    image_seed,
    write_conversation_dataset,
)
from unigen.shapes.render import render
from unigen.shapes.world import ShapeSpec, caption
from unigen.training.batches import IGNORE, BatchBuilder
from unigen.training.start import build_fresh

RED = ShapeSpec("red", "circle", "small", "top")
GREEN = ShapeSpec("green", "square", "large", "bottom left")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    chat = write_conversation_dataset(out, 12, seed=5)
    (out / "mixed.jsonl").write_text(write_dataset(out, 8, seed=5).read_text() + chat.read_text())
    return chat, out / "mixed.jsonl"


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A fresh smoke model whose word-level tokenizer is trained on the caption and conversation lines."""
    samples = read_samples(data[1])
    model, processor = build_fresh(recipe(data[1], tmp_path_factory.mktemp("run")), samples)
    return model.eval(), processor


def test_training_and_held_out_phrasings_share_no_question():
    assert set(TRAINING.questions) == set(HELD_OUT.questions) == set(KINDS)
    for kind in KINDS:
        assert len(TRAINING.questions[kind]) >= 5 and len(HELD_OUT.questions[kind]) >= 3
        assert not set(TRAINING.questions[kind]) & set(HELD_OUT.questions[kind])
    assert not set(TRAINING.current) & set(HELD_OUT.current) and not set(TRAINING.earlier) & set(HELD_OUT.earlier)
    train, held = TRAINING.all_questions(), HELD_OUT.all_questions()
    assert len(train) > 300 and len(held) > 150 and not train & held


def test_written_lines_use_training_phrasings_and_spec_renders(data):
    lines = [json.loads(x) for x in data[0].read_text().splitlines()]
    assert len(lines) == 12
    asked = {turn["value"].replace("<image>\n", "") for line in lines for turn in line["conversations"][0::2]}
    assert asked <= TRAINING.all_questions() and not asked & HELD_OUT.all_questions()
    assert {len(line["conversations"]) // 2 for line in lines} <= {2, 3, 4}
    assert any(len(line["image"]) > 1 for line in lines)  # multi-image conversations
    conv = draw_conversation(conversation_rng(5, 3), TRAINING)  # the writer's conversation 3, redrawn
    for j, spec in enumerate(conv.specs):
        written = np.asarray(render(spec, image_seed(5, 3, j), style="spec").pil())
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(data[0].parent / lines[3]["image"][j])), written)
    assert [t["value"] for t in lines[3]["conversations"][1::2]] == [conv.answer(t) for t in conv.turns]
    again = write_conversation_dataset(data[0].parent / "again", 12, seed=5)
    assert again.read_text() == data[0].read_text()  # byte-identical for the same seed


def test_word_noise_replaces_question_words_only(data, tmp_path):
    clean = [json.loads(x) for x in data[0].read_text().splitlines()]
    noisy_path = write_conversation_dataset(tmp_path, 12, seed=5, word_noise=0.3)
    noisy = [json.loads(x) for x in noisy_path.read_text().splitlines()]
    replaced = kept = 0
    for a, b in zip(clean, noisy, strict=True):
        assert a["image"] == b["image"]
        assert [t["value"] for t in a["conversations"][1::2]] == [t["value"] for t in b["conversations"][1::2]]
        for qa, qb in zip(a["conversations"][0::2], b["conversations"][0::2], strict=True):
            wa, wb = re.findall(r"\w+|[^\w\s]", qa["value"]), re.findall(r"\w+|[^\w\s]", qb["value"])
            assert len(wa) == len(wb)  # word for word; punctuation and the <image> tag stay
            for x, y in zip(wa, wb, strict=True):
                assert y == x or (y == NOISE_WORD and re.fullmatch(r"\w+", x))
                replaced += y != x
                kept += y == x
    assert 0.15 < replaced / (replaced + kept) < 0.35  # about the rate, over ~300 words
    assert NOISE_WORD not in TRAINING.words() + HELD_OUT.words()
    with pytest.raises(ValueError, match="word_noise"):
        write_conversation_dataset(tmp_path / "bad", 1, seed=5, word_noise=1.0)


def test_lines_build_multi_image_rows_with_the_trained_tokenizer(data, trained):
    model, processor = trained
    tokens = model.config.tokens
    samples = [s for s in read_samples(data[1]) if s.turns]
    assert len(samples) == 12 and any(len(s.images) > 1 for s in samples)
    unk = processor.tokenizer.convert_tokens_to_ids("<unk>")
    batch = BatchBuilder(model, processor, "Describe the image.").understanding(samples)
    assert batch["pixel_values"].shape[0] == sum(len(s.images) for s in samples)
    per_image = model.config.vision.num_tokens
    for s, ids, tgt in zip(samples, batch["input_ids"], batch["targets"], strict=True):
        ids, tgt = ids.tolist(), tgt.tolist()
        assert unk not in ids  # every training word is in the trained vocabulary
        assert ids.count(tokens.image) == per_image * len(s.images)
        # each answer supervised with its EOS, and each image's block before the answer of the turn that shows it
        ends = [t for t, x in enumerate(tgt) if x == tokens.eos]
        assert len(ends) == len(s.turns)
        start = 0
        for (_, answer), end, shown in zip(s.turns, ends, np.cumsum(s.turn_images), strict=True):
            supervised = [x for x in tgt[start:end] if x != IGNORE]
            assert processor.decode(supervised) == answer
            assert ids[: end + 1].count(tokens.image_start) == shown
            start = end + 1


@pytest.mark.parametrize("images, message", [
    (["a.png", "b.png"], "lists 2 file(s) but the human turns hold 1 <image> tag(s)"),
    ([], "'image' must be a file name or a non-empty list of file names"),
])
def test_multi_image_lines_need_one_tag_per_image(tmp_path, images, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": images, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And?"}, {"from": "gpt", "value": "blue"}]}) + "\n")
    with pytest.raises(ManifestError, match=re.escape(message)):
        read_samples(manifest)


def test_the_judge_accepts_right_answers_and_rejects_wrong_ones():
    assert judge_turn("describe", RED, caption(RED)) and judge_turn("describe", RED, "A small red circle, top.")
    assert judge_turn("color", RED, "red") and judge_turn("color", RED, "It is red.")
    assert judge_turn("position", RED, "at the top") and judge_turn("shape", RED, "a red circle")
    assert not judge_turn("describe", RED, "a small red circle")  # position missing
    assert not judge_turn("describe", RED, "a small red circle at the top left")
    assert not judge_turn("color", RED, "green") and not judge_turn("color", RED, "red and green")
    assert not judge_turn("color", RED, "a large red circle")  # right colour, wrong size named
    assert not judge_turn("size", RED, "") and not judge_turn("position", RED, "left")
    # the bug: the second image's answer takes the first one's colour
    taken = "a small green circle at the top"
    assert not judge_turn("describe", RED, taken) and carried_over(RED, [GREEN], taken)
    assert not carried_over(RED, [GREEN], caption(RED)) and not carried_over(RED, [GREEN], "a small blue circle")


class DescribesTheLatestImage:
    """A model that reads the last image shown with the checker and describes it, whatever the question."""

    def __init__(self):
        self.images_seen = []

    def chat(self, messages, max_new_tokens):
        images = [image for m in messages for image in m.get("images", [])]
        self.images_seen.append(len(images))
        return caption(check(images[-1]))


def test_scores_tell_turns_about_earlier_images_apart():
    pipe = DescribesTheLatestImage()
    scores, records = evaluate_chat(pipe, n=40, seed=2)
    convs = [draw_conversation(conversation_rng(2 + 1_000_003, i), HELD_OUT) for i in range(40)]
    assert len(records) == scores["turns"]["n"] == sum(len(c.turns) for c in convs)
    assert pipe.images_seen == [len(c.shown_before(t)) for c in convs for t in range(len(c.turns))]
    by = scores["by_reference"]
    assert by["new image"]["accuracy"] == by["latest image"]["accuracy"] == 1.0
    # a turn about an earlier image is right only when that image's spec is the latest one's
    same = [c.specs[t.image] == c.specs[len(c.shown_before(i)) - 1] for c in convs for i, t in enumerate(c.turns)
            if not t.shows_image and t.image != len(c.shown_before(i)) - 1]
    assert len(same) == by["earlier image"]["n"] > 0 and by["earlier image"]["accuracy"] == np.mean(same) < 0.5
    assert scores["carried_over"]["share"] > 0 and scores["carried_over"]["n"] == sum(
        r["carried"] is not None for r in records)
    assert all(r["question"] in HELD_OUT.all_questions() for r in records)
    assert sum(s["n"] for s in scores["by_kind"].values()) == scores["turns"]["n"]
    assert score_turns(records) == scores


def test_evaluate_chat_runs_on_a_tiny_random_model(trained, tmp_path, capsys):
    from unigen.cli import main

    pipe = UniGenPipeline(*trained)
    scores, records = evaluate_chat(pipe, n=3, seed=0, max_new_tokens=4)
    assert scores["turns"]["n"] == len(records) >= 6 and scores["conversations"]["n"] == 3
    assert all(isinstance(r["answer"], str) for r in records)
    pipe.save_pretrained(tmp_path / "model")
    rc = main(["eval", "shapes", "--model", str(tmp_path / "model"), "--task", "chat", "--n", "3",
               "--json", str(tmp_path / "s.json")])
    assert rc == 0 and "chat: turns right" in capsys.readouterr().out
    saved = json.loads((tmp_path / "s.json").read_text())["chat"]
    assert saved["turns"]["n"] == len(records) and set(saved["by_kind"]) == set(KINDS)


def test_a_multi_image_row_is_the_pipelines_chat_prompt_token_for_token(data, trained):
    """The trainer's row for a conversation holds, before its last answer, exactly the ids ``UniGenPipeline.chat``
    sends for the same conversation (images in the messages that show them)."""
    model, processor = trained
    s = next(s for s in read_samples(data[0]) if len(s.images) > 1)
    images = iter(s.images)
    messages = []
    for (question, answer), shown in zip(s.turns, s.turn_images, strict=True):
        messages += [{"role": "user", "content": question, "images": [next(images) for _ in range(shown)]},
                     {"role": "assistant", "content": answer}]
    prompt = processor.chat_inputs(messages[:-1])["input_ids"][0].tolist()
    ids, _ = BatchBuilder(model, processor, "Describe the image.").understanding_row(s)
    assert ids[: len(prompt)] == prompt and len(ids) > len(prompt)
