"""Which image decoder, and its options: names, defaults and checks in one place.

``decoding_options={"window": 8}`` in Python, ``--decoding-option window=8`` on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unigen.errors import ArgumentError

DECODING_METHODS = ("sequential", "jacobi", "zipar")


@dataclass(frozen=True)
class SequentialOptions:
    """One decoder pass per image token (no options)."""

    def check_bounds(self, vq) -> None:
        """Nothing to bound: sequential decoding has no option."""


@dataclass(frozen=True)
class JacobiOptions:
    """Speculative Jacobi decoding: ``window`` draft tokens are refined and verified in each pass."""

    window: int = 16

    def check_bounds(self, vq) -> None:
        """The draft never needs more tokens than the image has; a larger window only costs memory and time
        (each pass runs ``window`` rows)."""
        if self.window > vq.num_tokens:
            raise ArgumentError(f"decoding option window={self.window} for 'jacobi' exceeds the image's "
                                f"{vq.num_tokens} tokens; choose 1..{vq.num_tokens}")


@dataclass(frozen=True)
class ZipAROptions:
    """ZipAR: a grid row starts once the row above has ``window`` tokens (``None``: a quarter of the row
    width). ``window`` equal to the row width is sequential decoding."""

    window: int | None = None

    def resolved_window(self, width: int) -> int:
        return max(1, width // 4) if self.window is None else self.window

    def check_bounds(self, vq) -> None:
        if self.window is not None and self.window > vq.grid:
            raise ArgumentError(f"decoding option window={self.window} for 'zipar' exceeds the token grid's row "
                                f"width ({vq.grid}); choose 1..{vq.grid} ({vq.grid} is sequential decoding)")


OPTIONS = {"sequential": SequentialOptions, "jacobi": JacobiOptions, "zipar": ZipAROptions}


def decoding_options(method: str, options: dict | None = None):
    """``method`` and its options dict -> the method's options dataclass, every key and value checked (the
    bounds that depend on the model by ``check_bounds(vq_config)``)."""
    if method not in OPTIONS:
        raise ArgumentError(f"unknown decoding method {method!r}; choose one of {', '.join(DECODING_METHODS)}")
    cls = OPTIONS[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    options = dict(options or {})
    unknown = sorted(set(options) - fields)
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ArgumentError(f"unknown option(s) {', '.join(unknown)} for decoding {method!r}; its options: {known}")
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentError(f"decoding option {name} must be a whole number, got {value!r}")
        if value < 1:
            raise ArgumentError(f"decoding option {name} must be at least 1, got {value}")
    return cls(**options)


def parse_option(text: str) -> tuple[str, int]:
    """``key=value`` from the command line (values are whole numbers)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ArgumentError(f"--decoding-option expects key=value, got {text!r}")
    try:
        return key.strip(), int(value)
    except ValueError:
        raise ArgumentError(f"--decoding-option {key}: expected a whole number, got {value!r}") from None
