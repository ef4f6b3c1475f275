"""Every file a sample names, checked before training: images at the door (``unigen.data.images``) and
pre-extracted codes (``unigen.data.codes``). A sample that fails is skipped and listed
(``unigen.data.bad_samples``); too many of them stop the run in one line."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from unigen.data.bad_samples import BadSamples
from unigen.data.codes import BadCodes, codes_fit, read_codes
from unigen.data.images import image_problem
from unigen.data.manifest import CODE_FIELDS, Sample


def _problem(s: Sample) -> tuple[str, object] | None:
    """(reason, file) of the first thing wrong with ``s``'s files, or ``None``. Reads its codes into ``s.codes``."""
    pair_images = (s.chosen, s.rejected) if isinstance(s.chosen, Path) else ()  # an answer pair's are texts
    for path in (*(s.images or [s.image]), s.target, *pair_images):
        if path is not None and (problem := image_problem(path)) is not None:
            return problem, path
    for key in CODE_FIELDS:
        if (codes := getattr(s, key)) is not None:
            try:
                setattr(s, key, read_codes(codes, s.source))
            except BadCodes as err:
                return str(err), codes
    return None


def check_sample_files(samples: list[Sample], bad: BadSamples | None = None) -> tuple[list[Sample], list[dict]]:
    """Samples whose image, edit target and codes pass the checks (their codes read into int32 tensors); the
    others are added to ``bad``. Returns (good samples, bad rows); stops with one line when the bad share
    passes ``bad.max_fraction``."""
    bad = BadSamples() if bad is None else bad
    good = []
    for s in tqdm(samples, desc="checking samples", leave=False, mininterval=1.0, disable=len(samples) < 1000):
        found = _problem(s)
        if found is None:
            good.append(s)
        else:
            bad.add(s.source or str(found[1]), found[0], file=found[1], line=s.line)
    bad.check_share(len(samples))
    return good, bad.rows


def check_codes(samples: list[Sample], num_tokens: int, codebook_size: int, bad: BadSamples,
                total: int | None = None) -> list[Sample]:
    """Samples whose pre-extracted codes the model's VQ could have made (``num_tokens`` codes, each below
    ``codebook_size``); the others are added to ``bad``. ``total``: the samples read (default: these and the
    ones already in ``bad``), for the bad share that stops the run."""
    total = len(samples) + len(bad) if total is None else total
    good = []
    for s in samples:
        try:
            for key in CODE_FIELDS:
                if (given := getattr(s, key)) is not None:
                    setattr(s, key, read_codes(given, s.source))
                    what = s.source or f"line {s.line}"
                    codes_fit(getattr(s, key), num_tokens, codebook_size, what if key == "codes" else f"{what} {key}")
        except BadCodes as err:
            bad.add(s.source, str(err), file=given if isinstance(given, Path) else None, line=s.line)
            continue
        good.append(s)
    bad.check_share(total)
    return good
