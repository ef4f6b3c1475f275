"""How to sample, in one place: the options the pipeline, the CLI (generate, caption, eval), the Shapes
evaluator and ``sample/*.py`` share, the checks of their numbers, and the checkpoint's own defaults.

An option left ``None`` takes the checkpoint's value (``config.guidance_scale`` and ``config.temperature``
for images) in :meth:`SamplingOptions.with_defaults`, and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from unigen.errors import ArgumentError
from unigen.generation.decoding.options import DECODING_METHODS, decoding_options, parse_option

CAPTION_TEMPERATURE = 0.0  # captions are greedy unless asked otherwise


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgumentError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ArgumentError(f"{name} must be a finite number, got {value}")
    return value


def check_sampling_args(temperature: float | None, top_k: int | None, top_p: float | None,
                        guidance_scale: float | None = None) -> None:
    """Reject what would sample garbage (``nan < 0`` is False, so every number is first checked finite).
    ``None``: not given (the checkpoint's default or off), checked where it is filled in."""
    if temperature is not None and _number("temperature", temperature) < 0:
        raise ArgumentError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise ArgumentError(f"top_k must be a whole number, got {top_k!r}")
        if top_k < 0:
            raise ArgumentError(f"top_k must be >= 0 (0 or None = off), got {top_k}")
    if top_p is not None and not 0 < _number("top_p", top_p) <= 1:
        raise ArgumentError(f"top_p must be in (0, 1], got {top_p}")
    if guidance_scale is not None and _number("guidance_scale", guidance_scale) < 0:
        raise ArgumentError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")


# ---- CFG schedules -------------------------------------------------------------------------------


CFG_SCHEDULES = ("constant", "linear", "cutoff")


@dataclass(frozen=True)
class CFGSchedule:
    """Guidance scale per image token: ``constant``, ``linear`` (from 1 up to the scale over the
    image), or ``cutoff`` (the scale for the first ``cutoff`` tokens, then 1 = no guidance). Only ``cutoff``
    takes an argument; any other combination is refused when the schedule is made."""

    kind: str = "constant"
    cutoff: int | None = None

    def __post_init__(self):
        if self.kind not in CFG_SCHEDULES:
            raise ArgumentError(f"unknown cfg_schedule {self.kind!r}; expected constant, linear or cutoff:K")
        if self.kind != "cutoff" and self.cutoff is not None:
            raise ArgumentError(f"cfg_schedule {self.kind!r} takes no argument (got {self.kind}:{self.cutoff}); "
                                "only cutoff:K does")
        if self.kind == "cutoff" and (isinstance(self.cutoff, bool) or not isinstance(self.cutoff, int)
                                      or self.cutoff < 0):
            raise ArgumentError("cfg_schedule 'cutoff' needs cutoff:K with K >= 0 (the token index where guidance "
                                f"stops), got {self.cutoff!r}")

    def scales(self, scale: float, n: int) -> list[float]:
        if self.kind == "linear":
            return [1 + (scale - 1) * (i + 1) / n for i in range(n)]
        if self.kind == "cutoff":
            return [scale if i < self.cutoff else 1.0 for i in range(n)]
        return [scale] * n


def as_schedule(schedule: CFGSchedule | str | None) -> CFGSchedule:
    """``"constant"``, ``"linear"`` or ``"cutoff:K"`` (or a schedule, or ``None`` = constant), checked."""
    if schedule is None:
        return CFGSchedule()
    if isinstance(schedule, str):
        kind, sep, k = schedule.partition(":")
        if sep and kind != "cutoff":
            raise ArgumentError(f"cfg_schedule {schedule!r}: {kind!r} takes no argument; only cutoff:K does")
        if sep and not (k.isascii() and k.isdigit()):
            raise ArgumentError(f"cfg_schedule {schedule!r}: expected cutoff:K with K a token index >= 0")
        return CFGSchedule(kind, int(k) if sep else None)
    if not isinstance(schedule, CFGSchedule):
        raise ArgumentError(f"cfg_schedule must be a CFGSchedule or one of constant, linear, cutoff:K; got "
                            f"{schedule!r}")
    return schedule


@dataclass(frozen=True)
class SamplingOptions:
    """Options of one sampling call. Images: guidance, temperature, top-k/p, CFG schedule; text: temperature,
    top-k/p (guidance does not apply)."""

    guidance_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    cfg_schedule: CFGSchedule | str | None = None  # or "constant", "linear", "cutoff:K"
    decoding: str = "sequential"  # or "jacobi", "zipar" (unigen.generation.decoding)
    decoding_options: dict | None = None  # the method's options, e.g. {"window": 8}

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.guidance_scale)
        decoding_options(self.decoding, self.decoding_options)
        as_schedule(self.cfg_schedule)  # checks the schedule's form and its argument

    def with_defaults(self, config) -> SamplingOptions:
        """Image sampling: every option left ``None`` takes the checkpoint's value (``config`` is a
        ``UniGenConfig``); the result is checked again."""
        return dataclasses.replace(
            self,
            guidance_scale=config.guidance_scale if self.guidance_scale is None else self.guidance_scale,
            temperature=config.temperature if self.temperature is None else self.temperature)

    def for_text(self) -> SamplingOptions:
        """Text sampling: greedy unless a temperature was given."""
        return dataclasses.replace(self, temperature=CAPTION_TEMPERATURE if self.temperature is None
                                   else self.temperature)


# ---- command-line flags ------------------------------------------------------------------------------

def finite_float(text: str) -> float:
    """argparse ``type=`` for a number that must be finite (``nan`` and ``inf`` parse as floats)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed; image i of a run uses seed + i


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**63 - 1], got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_image_sampling_arguments(p: argparse.ArgumentParser, schedule: bool = True) -> None:
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="classifier-free guidance scale, 1 = none (default: the checkpoint's config.guidance_scale, "
                        "5 for Janus)")
    p.add_argument("--temperature", type=finite_float, default=None,
                   help="image-token temperature, 0 = greedy (default: the checkpoint's config.temperature, 1 for "
                        "Janus)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k most likely codes (default: all)")
    p.add_argument("--top-p", type=finite_float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    if schedule:
        p.add_argument("--cfg-schedule", default="constant",
                       help="constant, linear, or cutoff:K (guidance only for the first K tokens; default constant)")
    p.add_argument("--decoding", choices=DECODING_METHODS, default="sequential",
                   help="image decoder: sequential (one pass per token), jacobi (speculative Jacobi: same "
                        "distribution, fewer passes) or zipar (rows in parallel: fewest passes); default sequential")
    p.add_argument("--decoding-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the decoding method, repeatable: jacobi window=16 (draft tokens per pass); "
                        "zipar window=W (tokens of the row above before a row starts; default a quarter of a row)")


def options_from_args(args: argparse.Namespace) -> SamplingOptions:
    """The options of the flags :func:`add_image_sampling_arguments` adds (missing ones are ``None``)."""
    return SamplingOptions(guidance_scale=getattr(args, "guidance_scale", None),
                           temperature=getattr(args, "temperature", None), top_k=getattr(args, "top_k", None),
                           top_p=getattr(args, "top_p", None), cfg_schedule=getattr(args, "cfg_schedule", None),
                           decoding=getattr(args, "decoding", "sequential"),
                           decoding_options=dict(parse_option(t) for t in getattr(args, "decoding_option", [])))
