"""The run's one list of skipped samples, and the share of them that stops a run.

A bad sample (an image that is missing, not a regular file, beyond the size bounds or corrupt; a codes file
that is not a valid array of codes; a caption too long for the context) never stops a run by itself: it is
skipped and listed in ``OUTPUT_DIR/bad_samples.jsonl``, one JSON object per line with the reason. Only when
the bad share passes ``max_bad_fraction`` (a recipe / trainer option) does the run stop, in one line, before
it writes anything: that many bad samples means the data (or its paths) is wrong, not a few files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from unigen.errors import ConfigError, DataError
from unigen.runs import write_text

log = logging.getLogger("unigen.data")

BAD_SAMPLES_FILE = "bad_samples.jsonl"
DEFAULT_MAX_BAD_FRACTION = 0.05


class TooManyBadSamplesError(DataError):
    """The share of bad samples passed ``max_bad_fraction``; the message names the first ones."""


def check_max_bad_fraction(value: float, where: str = "max_bad_fraction") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where} must be a number in [0, 1] (the share of bad samples a run accepts), got "
                          f"{value!r}")
    return float(value)


class BadSamples:
    """Rows ``{"sample": where, "file": path, "reason": why}`` (``line`` too for a manifest line) of the samples
    a run skips. Every part of the pipeline that finds one (image checks, codes checks, prompt building)
    :meth:`add`\\ s it here, so the run has one list and one limit."""

    def __init__(self, max_fraction: float = DEFAULT_MAX_BAD_FRACTION):
        self.max_fraction = check_max_bad_fraction(max_fraction)
        self.rows: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, sample: str, reason: str, *, file: str | Path | None = None, line: int | None = None) -> None:
        row = {"sample": sample}
        if line:
            row["line"] = line
        if file is not None:
            row["file"] = str(file)
        row["reason"] = reason
        self.rows.append(row)

    def check_share(self, total: int, what: str = "samples", rows: list[dict] | None = None,
                    count: int | None = None) -> None:
        """Stop (one line) when more than ``max_fraction`` of ``total`` samples are bad (``rows``: the bad ones
        among those ``total``, when the list also holds others; default all; ``count``: how many are bad, when
        ``rows`` holds only the first few)."""
        rows = self.rows if rows is None else rows
        n = len(rows) if count is None else count
        if total <= 0 or n / total <= self.max_fraction:
            return
        first = "; ".join(f"{r['sample']}: {r['reason']}" for r in rows[:3])
        raise TooManyBadSamplesError(
            f"{n} of {total} {what} ({n / total:.1%}) are bad, more than max_bad_fraction={self.max_fraction:g}; "
            f"first: {first}{' ...' if n > 3 else ''}. Fix or remove them, or raise max_bad_fraction")

    def write(self, out_dir: str | Path) -> Path:
        """``out_dir/bad_samples.jsonl`` (written whole and renamed; an empty file when none is bad)."""
        path = Path(out_dir) / BAD_SAMPLES_FILE
        write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        if self.rows:
            log.warning("skipped %d bad sample(s), listed with the reason in %s", len(self.rows), path)
        return path
