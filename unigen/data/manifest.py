"""Samples from a JSONL manifest, an image folder with ``metadata.jsonl``, or (for the image trainers) a plain
folder of images: one parser, one set of error messages, for every command.

Line shapes (paths relative to the manifest's folder, or absolute; ``~`` is expanded):
  {"image": "a.png", "caption": "..."}                  understanding and generation ("text"/"prompt" also name
                                                        the caption)
  {"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
                                                        understanding (LLaVA style; every gpt turn is supervised)
  {"image": ["a.png", "b.png"], "conversations": [...]}  several images: one <image> tag per image, in the human
                                                        turn that shows it (each goes in front of that turn's text)
  {"text": "..."}                                       text-only
  {"image": SRC, "instruction": "make it blue", "target": TGT}
                                                        edit: source (understanding path) + instruction -> target
  {"image": "a.png"}                                    an image alone: for the VQ trainer
  {"prompt": "...", "chosen": A, "rejected": B}         an image pair: preference stages (docs/PREFERENCE.md);
                                                        optional "chosen_codes" / "rejected_codes": the VQ codes
                                                        the sampler drew, scored instead of a re-encoding
  {"image": ..., "question": "...", "chosen": "...", "rejected": "..."}
                                                        an answer pair: preference stages
imagefolder: ``metadata.jsonl`` lines {"file_name": ..., "text": ...} next to the images.
Optional ``"codes"`` on caption lines: pre-extracted VQ codes for generation, a list of ints or a ``.npy``
/ ``.pt`` file (checked by ``unigen.data.codes`` before training); on edit lines, the target's codes.
Edit samples train in the mixture's generation share (their loss is on image codes, as text-to-image's):
the two split it by their numbers of lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from unigen.data.jsonl import ManifestError, read_json_lines
from unigen.errors import DataError, DataNotFoundError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TEXT_KEYS = ("caption", "text", "prompt")  # what names an image's caption, first found wins
IMAGE_PAIR, ANSWER_PAIR = "image_pair", "answer_pair"  # the tasks of preference lines
CODE_FIELDS = ("codes", "chosen_codes", "rejected_codes")  # a sample's pre-extracted VQ codes, each checked alike

__all__ = ["ANSWER_PAIR", "CODE_FIELDS", "IMAGE_EXTS", "IMAGE_PAIR", "ManifestError", "Record", "Sample", "parse_line",
           "read_records", "read_samples"]


@dataclass
class Sample:
    line: int  # 1-based line in the manifest, for error messages (0: an image folder's file, a streamed record)
    image: Path | None = None  # streamed samples (unigen.data.stream) hold the decoded PIL image instead
    caption: str | None = None  # caption lines: understanding answer and generation prompt
    turns: list[tuple[str, str]] = field(default_factory=list)  # conversations: (human, gpt) pairs
    text: str | None = None  # text-only
    # VQ codes of the generation target (the image, or an edit's target): inline ints or a file; after
    # unigen.data.codes has checked them, an int32 tensor
    codes: list[int] | Path | torch.Tensor | None = None
    instruction: str | None = None  # edit lines
    target: Path | None = None  # edit lines: the edited image
    source: str = ""  # "manifest.jsonl:12" (or the image's path): where the sample came from, for messages
    images: list[Path] = field(default_factory=list)  # a multi-image conversation's images (``image`` is the first)
    turn_images: list[int] = field(default_factory=list)  # its images per turn; empty: one, before the first question
    # preference pairs: an image pair (``caption`` holds its prompt, ``chosen``/``rejected`` are image files,
    # with optional codes read like ``codes``) or an answer pair (``image``, ``question``, two answer texts)
    chosen: Path | str | None = None
    rejected: Path | str | None = None
    chosen_codes: list[int] | Path | torch.Tensor | None = None
    rejected_codes: list[int] | Path | torch.Tensor | None = None
    question: str | None = None

    @property
    def understanding_images(self) -> list:
        """The images of the understanding row, in the order they are shown."""
        return self.images or [self.image]

    @property
    def is_pair(self) -> bool:
        return self.chosen is not None

    @property
    def vq_image(self) -> Path | None:
        """The image whose VQ codes are the generation target."""
        return self.target if self.instruction is not None else self.image

    @property
    def image_text(self) -> str | None:
        """The text that goes with the image (a caption, or a conversation's last answer)."""
        return self.caption if self.caption is not None else (self.turns[-1][1] if self.turns else None)

    @property
    def tasks(self) -> list[str]:
        if self.is_pair:  # preference stages only (unigen.training.preference_stage); no SFT pool holds them
            return [IMAGE_PAIR if self.question is None else ANSWER_PAIR]
        if self.instruction is not None:
            return ["generation"]
        if self.text is not None:
            return ["text"]
        if self.turns:
            return ["understanding"]
        return ["understanding", "generation"] if self.caption is not None else []


@dataclass
class Record:
    """An image and its text: what the image trainers (VQ, SigLIP) read of a sample."""
    image: Path
    text: str | None = None


def _string(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _path(root: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else root / path


def _codes(record: dict, where: str, root: Path, key: str = "codes"):
    codes = record.get(key)
    if codes is None:
        return None
    if isinstance(codes, str) and codes:
        return _path(root, codes)
    if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise ManifestError(f"{where}: '{key}' must be a list of ints or a .npy/.pt file name")
    return codes


def _pair(record: dict, where: str, root: Path, line: int) -> Sample:
    """A preference line: an image pair (``prompt``) or an answer pair (``image`` + ``question``)."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ManifestError(f"{where}: a preference line needs 'chosen' and 'rejected'; '{key}' is missing (got "
                                f"keys {sorted(record)})")
    chosen, rejected = _string(record, "chosen", where), _string(record, "rejected", where)
    if "image" in record and "question" in record:
        if chosen.strip() == rejected.strip():
            raise ManifestError(f"{where}: 'chosen' and 'rejected' are the same answer {chosen!r}; a pair compares "
                                "two different answers")
        return Sample(line, image=_path(root, _string(record, "image", where)), chosen=chosen, rejected=rejected,
                      question=_string(record, "question", where), source=where)
    if "prompt" not in record or "image" in record:
        raise ManifestError(f"{where}: a preference line needs 'prompt' (an image pair) or 'image' and 'question' (an "
                            f"answer pair) beside 'chosen' and 'rejected'; got keys {sorted(record)}")
    chosen_path, rejected_path = _path(root, chosen), _path(root, rejected)
    if chosen_path.resolve() == rejected_path.resolve():
        raise ManifestError(f"{where}: 'chosen' and 'rejected' name the same image {chosen}; a pair compares two "
                            "different images")
    return Sample(line, caption=_string(record, "prompt", where), chosen=chosen_path, rejected=rejected_path,
                  chosen_codes=_codes(record, where, root, "chosen_codes"),
                  rejected_codes=_codes(record, where, root, "rejected_codes"), source=where)


def _turns(conv, where: str) -> list[tuple[str, str]]:
    shape = ("'conversations' must alternate human and gpt turns, starting with human, each "
             '{"from": ..., "value": "..."}')
    if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
        raise ManifestError(f"{where}: {shape}; got {len(conv) if isinstance(conv, list) else type(conv).__name__}"
                            " turn(s)")
    turns = []
    for i in range(0, len(conv), 2):
        human, gpt = conv[i], conv[i + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict) and human.get("from") == "human"
                and gpt.get("from") == "gpt" and isinstance(human.get("value"), str)
                and isinstance(gpt.get("value"), str)):
            raise ManifestError(f"{where}: {shape} (turn {i + 1} is not)")
        turns.append((human["value"].replace("<image>", "").strip(), gpt["value"]))
    return turns


def _multi_image_conversation(record: dict, names: list, where: str, root: Path, line: int) -> Sample:
    """A conversation line whose ``image`` lists several files, each shown by an ``<image>`` tag of a human turn."""
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ManifestError(f"{where}: 'image' must be a file name or a non-empty list of file names; got {names!r}")
    turns = _turns(record["conversations"], where)
    counts = [turn["value"].count("<image>") for turn in record["conversations"][0::2]]
    if sum(counts) != len(names):
        raise ManifestError(f"{where}: 'image' lists {len(names)} file(s) but the human turns hold {sum(counts)} "
                            "<image> tag(s); give one tag per image, in the turn that shows it")
    paths = [_path(root, n) for n in names]
    return Sample(line, image=paths[0], turns=turns, source=where, images=paths, turn_images=counts)


def parse_line(record, where: str, root: Path, line: int, text_key: str | None = None) -> Sample:
    """One manifest line -> a :class:`Sample` (``text_key``: the only key that names the caption)."""
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "chosen" in record or "rejected" in record:
        return _pair(record, where, root, line)
    image = record.get("image", record.get("file_name"))
    if isinstance(image, list) and "conversations" in record and text_key is None:
        return _multi_image_conversation(record, image, where, root, line)
    if image is None and "text" in record:
        return Sample(line, text=_string(record, "text", where), source=where)
    if not isinstance(image, str) or not image:
        raise ManifestError(f"{where}: needs 'image' (or 'file_name') with 'caption'/'text' or 'conversations', "
                            f"or a text-only 'text'; got keys {sorted(record)}")
    if "instruction" in record or "target" in record:
        for key in ("instruction", "target"):
            if key not in record:
                raise ManifestError(f"{where}: an edit line needs 'image', 'instruction' and 'target'; '{key}' is "
                                    f"missing (got keys {sorted(record)})")
        return Sample(line, image=_path(root, image), instruction=_string(record, "instruction", where),
                      target=_path(root, _string(record, "target", where)), codes=_codes(record, where, root),
                      source=where)
    if "conversations" in record and text_key is None:
        return Sample(line, image=_path(root, image), turns=_turns(record["conversations"], where), source=where)
    key = next((k for k in ((text_key,) if text_key else TEXT_KEYS) if k in record), None)
    return Sample(line, image=_path(root, image), caption=None if key is None else _string(record, key, where),
                  codes=_codes(record, where, root), source=where)


def _manifest_of(source: Path, images_alone: bool) -> Path | None:
    """The JSONL file to read for ``source``; ``None`` for a plain folder of images (image trainers only)."""
    if source.is_dir():
        if (source / "metadata.jsonl").is_file() and not images_alone:
            return source / "metadata.jsonl"
        if images_alone:
            return None
        raise ManifestError(f"{source} is a folder without metadata.jsonl, but captions are needed: add "
                            'metadata.jsonl ({"file_name": ..., "text": ...} per line) or pass a JSONL manifest')
    if not source.is_file():
        kinds = ", an image folder with metadata.jsonl, or a folder of images" if images_alone else \
            " or an image folder with metadata.jsonl"
        raise DataNotFoundError(f"training data {source} does not exist (a JSONL manifest{kinds})")
    return source


def _folder_images(folder: Path) -> list[Sample]:
    samples = [Sample(0, image=p, source=str(p)) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
    if not samples:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {folder}")
    return samples


def read_samples(source: str | Path, *, need: str = "task", text_key: str | None = None) -> list[Sample]:
    """Every sample of a manifest or image folder, in file order.

    ``need``: ``"task"`` (the stage trainer: every line trains a task), ``"image"`` (the VQ trainer: every line
    has an image; a folder is read as all its image files, recursively and sorted) or ``"image_text"`` (the
    SigLIP trainer: an image and its text, from ``text_key`` if given). Other than for ``"image"``, a folder
    needs its ``metadata.jsonl``.
    """
    source = Path(source).expanduser()
    path = _manifest_of(source, need == "image")
    if path is None:
        return _folder_images(source)
    samples = []
    for n, record in read_json_lines(path):
        where = f"{path}:{n}"
        s = parse_line(record, where, path.parent, n, text_key)
        if need == "task" and not s.tasks:
            raise ManifestError(f"{where}: image line needs a non-empty 'caption' (or 'text'); got keys "
                                f"{sorted(record)}")
        if need != "task" and s.image is None:
            raise ManifestError(f"{where}: needs 'image' (the image trainers read images); got keys {sorted(record)}")
        if need == "image_text" and s.image_text is None:
            keys = [text_key] if text_key else [*TEXT_KEYS, "conversations"]
            raise ManifestError(f"{where}: needs the image's text in one of {keys}; got keys {sorted(record)}")
        samples.append(s)
    if not samples:
        raise ManifestError(f"{path} holds no samples")
    return samples


def read_records(source: str | Path, need_text: bool = False, text_key: str | None = None) -> list[Record]:
    """(image, text) records for the image trainers: :func:`read_samples` with ``need="image"`` or
    ``"image_text"``."""
    samples = read_samples(source, need="image_text" if need_text else "image", text_key=text_key)
    return [Record(s.image, s.image_text) for s in samples]
