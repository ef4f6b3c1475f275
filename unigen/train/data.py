"""Training samples from a JSONL manifest or a Hugging Face imagefolder (``metadata.jsonl``).

Line shapes (paths relative to the manifest):
  {"image": "a.png", "caption": "..."}                  understanding and generation
  {"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}
  {"text": "..."}                                         text-only
imagefolder: ``metadata.jsonl`` lines {"file_name": ..., "text": ...} next to the images.
Optional ``"codes": [...]`` on image lines: pre-extracted VQ codes for generation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class Sample:
    line: int  # 1-based line in the manifest, for error messages
    image: Path | None = None
    caption: str | None = None  # caption lines: understanding answer and generation prompt
    question: str | None = None  # conversations: the human turn (without <image>)
    answer: str | None = None  # conversations: the gpt turn
    text: str | None = None  # text-only
    codes: list[int] | None = None

    @property
    def tasks(self) -> list[str]:
        if self.text is not None:
            return ["text"]
        if self.answer is not None:
            return ["understanding"]
        return ["understanding", "generation"]


class ManifestError(ValueError):
    pass


def _parse(record, where: str, root: Path, line: int) -> Sample:
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record and "image" not in record and "file_name" not in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ManifestError(f"{where}: 'text' must be a non-empty string")
        return Sample(line, text=record["text"])
    image = record.get("image", record.get("file_name"))
    if not isinstance(image, str):
        raise ManifestError(f"{where}: needs 'image' (or 'file_name') with 'caption'/'text', 'conversations', "
                            f"or a text-only 'text'; got keys {sorted(record)}")
    codes = record.get("codes")
    if "conversations" in record:
        conv = record["conversations"]
        ok = isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, dict) and "value" in t for t in conv)
        if not ok or conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
            raise ManifestError(f"{where}: 'conversations' must start with a human turn then a gpt turn")
        question = conv[0]["value"].replace("<image>", "").strip()
        return Sample(line, image=root / image, question=question, answer=conv[1]["value"], codes=codes)
    caption = record.get("caption", record.get("text"))
    if not isinstance(caption, str) or not caption.strip():
        raise ManifestError(f"{where}: image line needs a non-empty 'caption' (or 'text')")
    return Sample(line, image=root / image, caption=caption, codes=codes)


def read_samples(path: str | Path) -> list[Sample]:
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist (a JSONL manifest or an imagefolder "
                                "with metadata.jsonl)")
    samples = []
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{i}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{where}: not valid JSON ({err})") from err
        samples.append(_parse(record, where, path.parent, i))
    if not samples:
        raise ManifestError(f"{path} holds no samples")
    return samples


def check_images(samples: list[Sample]) -> tuple[list[Sample], list[dict]]:
    """Drop samples whose image is missing or does not decode; return (good, bad records)."""
    good, bad = [], []
    for s in samples:
        if s.image is None:
            good.append(s)
            continue
        try:
            with Image.open(s.image) as img:
                img.verify()
            good.append(s)
        except (OSError, SyntaxError, ValueError) as err:
            bad.append({"line": s.line, "image": str(s.image), "error": f"{type(err).__name__}: {err}"})
    return good, bad
