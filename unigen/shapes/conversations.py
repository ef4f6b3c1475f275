"""Multi-turn, multi-image conversations about the Shapes world (v1): question phrasings, conversations and their
training lines.

A conversation shows 1-4 images over 2-4 turns; each turn either shows a new image and asks about it, or asks about
one shown earlier (the latest, or one named by its ordinal: "the second image"). Questions come in five kinds:
``describe`` (answered with the canonical caption) and one per attribute (answered with its value alone: "red",
"circle", "small", "top left"). The phrasings are split in two: ``TRAINING`` phrasings make the training lines
(:func:`write_conversation_dataset`), ``HELD_OUT`` ones only the evaluation's conversations
(``unigen.shapes.chat_eval``), so a score on them measures questions the model never trained on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unigen.shapes.render import render
from unigen.shapes.world import ATTRIBUTES, ShapeSpec, all_combinations, caption

KINDS: tuple[str, ...] = ("describe", *ATTRIBUTES)
MAX_IMAGES = 4
ORDINALS: tuple[str, ...] = ("first", "second", "third", "fourth")
CHAT_STREAM = 0xC4A7  # in every conversation seed: apart from the caption data's and evaluation's render seeds
NEW_IMAGE_SHARE = 0.5  # of the turns after the first (while fewer than MAX_IMAGES are shown)
# A word no tokenizer trained on these lines knows: a word-level tokenizer reads it as <unk>, exactly as it reads a
# held-out phrasing's new words, so lines with it teach answering around words the model has never seen.
NOISE_WORD = "wug"
NOISE_STREAM = 0x4E01  # the word-noise draws: apart from the conversation's, so word_noise=0 lines stay the same


@dataclass(frozen=True)
class Phrasings:
    """Question templates per kind (``{ref}`` names the image), and how an image is named: ``current`` the one
    just shown, ``earlier`` any by its ordinal (``{ord}``)."""

    questions: dict[str, tuple[str, ...]]
    current: tuple[str, ...]
    earlier: tuple[str, ...]

    def all_questions(self) -> set[str]:
        """Every question these phrasings write."""
        refs = [*self.current, *(e.format(ord=o) for e in self.earlier for o in ORDINALS)]
        return {q.format(ref=r) for templates in self.questions.values() for q in templates for r in refs}

    def words(self) -> list[str]:
        """The words and punctuation of every template, as a word-level tokenizer splits them."""
        texts = [*self.current, *self.earlier, *ORDINALS, *(q for t in self.questions.values() for q in t)]
        found = re.findall(r"\w+|[^\w\s]", " ".join(texts).replace("{ref}", " ").replace("{ord}", " "))
        return list(dict.fromkeys(found))


TRAINING = Phrasings(
    questions={
        "describe": ("Describe {ref}.", "What is in {ref}?", "What do you see in {ref}?", "Tell me what {ref} shows.",
                     "Caption {ref}.", "What does {ref} show?", "Write a caption for {ref}.",
                     "Give a short description of {ref}.", "Can you describe {ref}?", "What can you see in {ref}?"),
        "color": ("What color is the shape in {ref}?", "What colour is the object in {ref}?",
                  "Which color does the shape in {ref} have?", "What is the color of the shape in {ref}?",
                  "Name the colour of the object in {ref}.", "What color is the thing in {ref}?"),
        "shape": ("What shape is in {ref}?", "Which shape does {ref} show?", "What kind of shape is in {ref}?",
                  "Name the shape in {ref}.", "What is the shape of the object in {ref}?"),
        "size": ("How big is the shape in {ref}?", "Is the shape in {ref} small or large?",
                 "What size is the object in {ref}?", "What is the size of the shape in {ref}?",
                 "Is the object in {ref} large or small?"),
        "position": ("Where is the shape in {ref}?", "Where is the object in {ref}?", "Where in {ref} is the shape?",
                     "What is the position of the shape in {ref}?", "In which part of {ref} is the object?"),
    },
    current=("the image", "this image", "the picture"),
    earlier=("the {ord} image", "the {ord} picture"),
)

HELD_OUT = Phrasings(
    questions={
        "describe": ("What is shown in {ref}?", "Please describe {ref}.", "Describe what you see in {ref}.",
                     "What's in {ref}?", "Could you tell me what is in {ref}?", "Explain {ref} briefly."),
        "color": ("Which colour is the shape in {ref}?", "Tell me the color of the object in {ref}.",
                  "What colour does the object in {ref} have?", "The shape in {ref}: what color is it?"),
        "shape": ("Which shape is shown in {ref}?", "What sort of shape is in {ref}?",
                  "Tell me which shape {ref} holds."),
        "size": ("Is the shape in {ref} big or small?", "How large is the object in {ref}?",
                 "Tell me the size of the shape in {ref}."),
        "position": ("Where is the object located in {ref}?", "Where can the shape be found in {ref}?",
                     "Which part of {ref} holds the shape?", "Where does the shape sit in {ref}?"),
    },
    current=("this picture", "the photo"),
    earlier=("the {ord} photo", "the {ord} one"),
)


@dataclass(frozen=True)
class Turn:
    image: int  # which image of the conversation the question is about (0-based)
    shows_image: bool  # this turn's message shows that image (a new one)
    kind: str  # one of KINDS
    question: str


@dataclass(frozen=True)
class Conversation:
    specs: tuple[ShapeSpec, ...]  # the images' specs, in the order they are shown
    turns: tuple[Turn, ...]

    def answer(self, turn: Turn) -> str:
        """The right answer: the caption for ``describe``, else the attribute's value."""
        spec = self.specs[turn.image]
        return caption(spec) if turn.kind == "describe" else getattr(spec, turn.kind)

    def shown_before(self, index: int) -> list[int]:
        """The images shown up to and including turn ``index``."""
        return list(range(sum(t.shows_image for t in self.turns[: index + 1])))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def draw_conversation(rng: np.random.Generator, phrasings: Phrasings) -> Conversation:
    """2-4 turns; the first shows an image, each later one shows a new image (while fewer than four are shown) or
    asks about one shown before, named as the latest or by its ordinal. Specs uniform over the 576."""
    combos = all_combinations()
    specs: list[ShapeSpec] = []
    turns = []
    for t in range(int(rng.integers(2, 5))):
        kind = _pick(rng, KINDS)
        template = _pick(rng, phrasings.questions[kind])
        new = t == 0 or (len(specs) < MAX_IMAGES and rng.random() < NEW_IMAGE_SHARE)
        if new:
            specs.append(_pick(rng, combos))
            image, ref = len(specs) - 1, _pick(rng, phrasings.current)
        else:
            image = int(rng.integers(len(specs)))
            latest = image == len(specs) - 1 and rng.random() < 0.5
            ref = _pick(rng, phrasings.current) if latest else _pick(rng, phrasings.earlier).format(ord=ORDINALS[image])
        turns.append(Turn(image, new, kind, template.format(ref=ref)))
    return Conversation(tuple(specs), tuple(turns))


def conversation_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, CHAT_STREAM, index])


def image_seed(seed: int, index: int, image: int) -> list[int]:
    """Render seed of image ``image`` of conversation ``index``: apart from ``write_dataset``'s ``[seed, i]``."""
    return [seed, CHAT_STREAM, index, image]


def add_word_noise(question: str, rate: float, rng: np.random.Generator) -> str:
    """``question`` with each word replaced by ``NOISE_WORD`` with probability ``rate`` (punctuation kept)."""
    return re.sub(r"\w+", lambda m: NOISE_WORD if rng.random() < rate else m.group(0), question)


def write_conversation_dataset(out_dir: str | Path, n: int, seed: int, split: str = "chat",
                               progress: bool | None = None, word_noise: float = 0.0) -> Path:
    """``n`` conversations in the training phrasings as LLaVA-style lines (``unigen.data.manifest``): ``image``
    lists the conversation's renders (``style="spec"``), each shown by an ``<image>`` tag of the human turn that
    shows it; every answer is supervised. ``word_noise``: the share of question words replaced by a word the model
    cannot know (``add_word_noise``). Returns ``out_dir/{split}.jsonl``; byte-identical for the same seed.
    Seeds from ``unigen.shapes.evaluate.EVAL_SEED_OFFSET`` up are the evaluation's."""
    if not 0.0 <= word_noise < 1.0:
        raise ValueError(f"word_noise must be in [0, 1), got {word_noise}")
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{split}.jsonl"
    show = n >= 1000 if progress is None else progress
    with manifest.open("w") as f:
        for i in tqdm(range(n), desc=f"conversations {split}", disable=not show):
            conv = draw_conversation(conversation_rng(seed, i), TRAINING)
            noise = np.random.default_rng([seed, CHAT_STREAM, i, NOISE_STREAM])
            names = [f"{split}/{i:06d}_{j}.png" for j in range(len(conv.specs))]
            for j, (spec, name) in enumerate(zip(conv.specs, names, strict=True)):
                render(spec, image_seed(seed, i, j), style="spec").pil().save(out_dir / name, format="PNG")
            lines = []
            for turn in conv.turns:
                question = add_word_noise(turn.question, word_noise, noise) if word_noise else turn.question
                lines += [{"from": "human", "value": ("<image>\n" if turn.shows_image else "") + question},
                          {"from": "gpt", "value": conv.answer(turn)}]
            f.write(json.dumps({"image": names, "conversations": lines}) + "\n")
    return manifest


def add_conversation_words(checkpoint: str | Path, vocab_size: int | None = None) -> list[str]:
    """Add the training phrasings' words a checkpoint's word-level tokenizer lacks (``add_words``); held-out
    words stay unknown, as they would to a tokenizer trained on the training lines."""
    from unigen.shapes.editing import add_words

    return add_words(checkpoint, TRAINING.words(), vocab_size)
