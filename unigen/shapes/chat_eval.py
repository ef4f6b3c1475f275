"""``--task chat``: conversations of 2-4 turns with held-out phrasings, answered by ``UniGenPipeline.chat``.

Each conversation is a real chat: every turn's message holds its question (and its new image, if it shows one)
after the model's own earlier answers. A turn is right when its answer is: :func:`judge_turn`. Besides the
accuracies, :func:`carried_over` counts the turns whose answer takes an attribute from another image of the
conversation (the second image's answer naming the first one's colour).
"""

from __future__ import annotations

from tqdm import tqdm

from unigen.shapes.captions import parse_caption
from unigen.shapes.conversations import HELD_OUT, KINDS, Conversation, conversation_rng, draw_conversation, image_seed
from unigen.shapes.evaluate import EVAL_SEED_OFFSET
from unigen.shapes.render import render
from unigen.shapes.world import ATTRIBUTES, ShapeSpec

REFERENCES = ("new image", "latest image", "earlier image")  # what a turn asks about


def judge_turn(kind: str, truth: ShapeSpec, answer: str) -> bool:
    """Right when the answer names the asked attribute's value (all four for ``describe``, as a caption) and every
    attribute it names is the image's: "a large red circle" is a wrong answer to "what colour?" about a small one."""
    said = parse_caption(answer)
    asked = ATTRIBUTES if kind == "describe" else (kind,)
    named = [a for a in ATTRIBUTES if getattr(said, a) is not None]
    return all(getattr(said, a) == getattr(truth, a) for a in (*asked, *named))


def carried_over(truth: ShapeSpec, others: list[ShapeSpec], answer: str) -> bool:
    """Whether the answer names a wrong value of some attribute that another image of the conversation has."""
    said = parse_caption(answer)
    return any(getattr(said, a) is not None and getattr(said, a) != getattr(truth, a)
               and any(getattr(o, a) == getattr(said, a) for o in others) for a in ATTRIBUTES)


def reference(conv: Conversation, index: int) -> str:
    turn = conv.turns[index]
    if turn.shows_image:
        return "new image"
    return "latest image" if turn.image == len(conv.shown_before(index)) - 1 else "earlier image"


def _share(right: list[bool]) -> dict:
    return {"accuracy": sum(right) / len(right) if right else None, "n": len(right)}


def score_turns(records: list[dict]) -> dict:
    """Scores of judged turns (``conversation``, ``turn``, ``kind``, ``reference``, ``right``, ``carried``
    (None: no other image shown yet))."""
    right = [r["right"] for r in records]
    conversations: dict[int, bool] = {}
    for r in records:
        conversations[r["conversation"]] = conversations.get(r["conversation"], True) and r["right"]
    eligible = [r["carried"] for r in records if r["carried"] is not None]
    turn_indices = sorted({r["turn"] for r in records})
    return {
        "turns": _share(right),
        "conversations": _share(list(conversations.values())),
        "by_turn": {str(t + 1): _share([r["right"] for r in records if r["turn"] == t]) for t in turn_indices},
        "by_kind": {k: _share([r["right"] for r in records if r["kind"] == k]) for k in KINDS},
        "by_reference": {k: _share([r["right"] for r in records if r["reference"] == k]) for k in REFERENCES},
        "carried_over": {"share": sum(eligible) / len(eligible) if eligible else None, "n": len(eligible)},
    }


def evaluate_chat(pipe, n: int = 200, seed: int = 0, max_new_tokens: int = 24, style: str = "spec",
                  keep: bool = True) -> tuple[dict, list[dict]]:
    """``n`` conversations in the held-out phrasings (seeds apart from the training lines'), answered greedily;
    return (scores, per-turn records; without ``keep`` the records lose their images and answers)."""
    records = []
    for i in tqdm(range(n), desc="chat", unit="conversation"):
        records += run_conversation(pipe, i, seed + EVAL_SEED_OFFSET, max_new_tokens, style, keep)
    return score_turns(records), records


def run_conversation(pipe, index: int, seed: int, max_new_tokens: int, style: str, keep: bool) -> list[dict]:
    """One conversation turn by turn, each answer the model's own and part of the next turn's history."""
    conv = draw_conversation(conversation_rng(seed, index), HELD_OUT)
    images = [render(spec, image_seed(seed, index, j), style=style).pil() for j, spec in enumerate(conv.specs)]
    messages, records = [], []
    for t, turn in enumerate(conv.turns):
        messages.append({"role": "user", "content": turn.question,
                         "images": [images[turn.image]] if turn.shows_image else []})
        answer = pipe.chat(messages, max_new_tokens=max_new_tokens)
        messages.append({"role": "assistant", "content": answer})
        truth = conv.specs[turn.image]
        others = [conv.specs[j] for j in conv.shown_before(t) if j != turn.image]
        record = {"conversation": index, "turn": t, "kind": turn.kind, "reference": reference(conv, t),
                  "right": judge_turn(turn.kind, truth, answer),
                  "carried": carried_over(truth, others, answer) if others else None}
        if keep:
            record |= {"question": turn.question, "answer": answer, "truth": conv.answer(turn),
                       "image": images[turn.image]}
        records.append(record)
    return records


def format_chat_table(scores: dict) -> str:
    """The chat scores as lines of text for the terminal."""
    def cell(s: dict) -> str:
        return "-" if s["accuracy"] is None else f"{s['accuracy']:.3f} (n={s['n']})"

    lines = [f"chat: turns right {cell(scores['turns'])}, conversations all right {cell(scores['conversations'])}",
             "  by turn: " + ", ".join(f"{t} {cell(s)}" for t, s in scores["by_turn"].items()),
             "  by kind: " + ", ".join(f"{k} {cell(s)}" for k, s in scores["by_kind"].items()),
             "  by reference: " + ", ".join(f"{k} {cell(s)}" for k, s in scores["by_reference"].items())]
    carried = scores["carried_over"]
    share = "-" if carried["share"] is None else f"{carried['share']:.3f}"
    lines.append(f"  answers taking an attribute from another image: {share} (of {carried['n']} turns with one shown)")
    return "\n".join(lines)
