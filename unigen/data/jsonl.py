"""The one JSON-lines reader: manifests (written by people: every bad line is an error naming it) and run logs
(written by unigen: a torn last line, cut short by a full disk or a kill, is dropped with a warning); and
``read_json_object``, for the JSON files unigen writes (configs, run.json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from unigen.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger("unigen.data")


class ManifestError(DataError):
    """A manifest (or a line of it) of the wrong shape; the message names the file and line."""


def read_json_lines(path: Path, *, run_log: bool = False) -> list[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of ``path``.

    A manifest (``run_log=False``) must be UTF-8 and every line valid JSON, else :class:`ManifestError` naming
    ``file:line``. A run log (``run_log=True``) is unigen's own file: its lines must be JSON objects, a torn last
    line is dropped with a warning, a bad line elsewhere is a :class:`ConfigError` naming it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace" if run_log else "strict")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path} is not UTF-8 text ({err}); a manifest is JSON lines") from err
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            if run_log and not isinstance(value, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if not run_log:
                raise ManifestError(f"{path}:{n}: not valid JSON ({err})") from err
            if n == len(lines):
                log.warning("%s: dropping its torn last line %d (a write that was cut short): %.80r", path, n, line)
                break
            raise ConfigError(f"{path}:{n} is not a JSON object ({err}); move the file away to start a new "
                              "log") from err
        rows.append((n, value))
    return rows


def read_json_object(path: Path) -> dict:
    """A JSON file unigen wrote that must hold one object (a config, run.json): damaged, it is one
    :class:`CheckpointError` line naming the file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the folder is damaged: train or copy it "
                              "again") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object of config keys, got {type(raw).__name__}")
    return raw
