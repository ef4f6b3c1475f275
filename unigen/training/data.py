"""Training samples from a JSONL manifest or a Hugging Face imagefolder (``metadata.jsonl``).

Line shapes (paths relative to the manifest):
  {"image": "a.png", "caption": "..."}                  understanding and generation
  {"image": ..., "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
                                                        understanding (LLaVA style; every gpt turn is supervised)
  {"text": "..."}                                       text-only
  {"image": SRC, "instruction": "make it blue", "target": TGT}
                                                        edit: source (understanding path) + instruction -> target
imagefolder: ``metadata.jsonl`` lines {"file_name": ..., "text": ...} next to the images.
Optional ``"codes"`` on caption lines: pre-extracted VQ codes for generation, a list of ints or a ``.npy``
/ ``.pt`` file (relative to the manifest); on edit lines, the target's codes.
Edit samples train in the mixture's generation share (their loss is on image codes, as text-to-image's):
the two split it by their numbers of lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from unigen.errors import DataError, DataNotFoundError


@dataclass
class Sample:
    line: int  # 1-based line in the manifest, for error messages
    image: Path | None = None
    caption: str | None = None  # caption lines: understanding answer and generation prompt
    turns: list[tuple[str, str]] = field(default_factory=list)  # conversations: (human, gpt) pairs
    text: str | None = None  # text-only
    codes: list[int] | Path | None = None  # VQ codes of the generation target (the image, or an edit's target)
    instruction: str | None = None  # edit lines
    target: Path | None = None  # edit lines: the edited image

    @property
    def vq_image(self) -> Path | None:
        """The image whose VQ codes are the generation target."""
        return self.target if self.instruction is not None else self.image

    @property
    def tasks(self) -> list[str]:
        if self.instruction is not None:
            return ["generation"]
        if self.text is not None:
            return ["text"]
        if self.turns:
            return ["understanding"]
        return ["understanding", "generation"]


class ManifestError(DataError):
    """A manifest line of the wrong shape; the message names the file and line."""


def _string(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _codes(record: dict, where: str, root: Path):
    codes = record.get("codes")
    if codes is None:
        return None
    if isinstance(codes, str):
        return root / codes
    if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise ManifestError(f"{where}: 'codes' must be a list of ints or a .npy/.pt file name")
    return codes


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


def parse_line(record, where: str, root: Path, line: int) -> Sample:
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    image = record.get("image", record.get("file_name"))
    if image is None and "text" in record:
        return Sample(line, text=_string(record, "text", where))
    if not isinstance(image, str) or not image:
        raise ManifestError(f"{where}: needs 'image' (or 'file_name') with 'caption'/'text' or 'conversations', "
                            f"or a text-only 'text'; got keys {sorted(record)}")
    if "instruction" in record or "target" in record:
        for key in ("instruction", "target"):
            if key not in record:
                raise ManifestError(f"{where}: an edit line needs 'image', 'instruction' and 'target'; '{key}' is "
                                    f"missing (got keys {sorted(record)})")
        return Sample(line, image=root / image, instruction=_string(record, "instruction", where),
                      target=root / _string(record, "target", where), codes=_codes(record, where, root))
    if "conversations" in record:
        return Sample(line, image=root / image, turns=_turns(record["conversations"], where))
    key = "caption" if "caption" in record else "text"
    if key not in record:
        raise ManifestError(f"{where}: image line needs a non-empty 'caption' (or 'text'); got keys {sorted(record)}")
    return Sample(line, image=root / image, caption=_string(record, key, where), codes=_codes(record, where, root))


def read_samples(path: str | Path) -> list[Sample]:
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise DataNotFoundError(f"training data {path} does not exist (a JSONL manifest or an imagefolder "
                                "with metadata.jsonl)")
    samples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path} is not UTF-8 text ({err}); a manifest is JSON lines") from err
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{i}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{where}: not valid JSON ({err})") from err
        samples.append(parse_line(record, where, path.parent, i))
    if not samples:
        raise ManifestError(f"{path} holds no samples")
    return samples


def check_images(samples: list[Sample]) -> tuple[list[Sample], list[dict]]:
    """Drop samples whose image (or edit target) is missing or does not decode; return (good, bad records)."""
    good, bad = [], []
    for s in samples:
        for path in (s.image, s.target):
            if path is None:
                continue
            try:
                with Image.open(path) as img:
                    img.load()  # a full decode: verify() lets truncated files through
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                bad.append({"line": s.line, "image": str(path), "error": f"{type(err).__name__}: {err}"})
                break
        else:
            good.append(s)
    return good, bad
