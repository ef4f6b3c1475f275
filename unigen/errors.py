"""What unigen raises when the input is wrong (not when unigen is): the CLI prints these as one
``error: ...`` line and exits 1 (2 for :class:`ArgumentError`); ``--debug`` or ``UNIGEN_DEBUG=1`` shows
the traceback.

Each class also derives from the built-in exception that code written before this hierarchy caught
(``ValueError``, ``FileNotFoundError``, ``FileExistsError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UniGenError(Exception):
    """Base class: the message says what was wrong and what to do."""


class ArgumentError(UniGenError, ValueError):
    """A command-line flag or a function argument out of range (a usage error: exit code 2)."""


class ConfigError(UniGenError, ValueError):
    """A recipe, a config.json or a ``key=value`` override that cannot be used."""


class DataError(UniGenError, ValueError):
    """Training or input data (a manifest, an image) that cannot be used."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data path (manifest, image folder) that does not exist."""


class CheckpointError(UniGenError, ValueError):
    """A checkpoint directory or file that cannot be loaded (or must not be, such as a pickle that runs code)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class OutputExistsError(UniGenError, FileExistsError):
    """Writing would replace earlier results; the message names the flag that allows it."""


class OutputLockedError(UniGenError, BlockingIOError):
    """Another unigen run holds the output folder (``unigen.output_lock``); the message names its PID."""


class OutputWriteError(UniGenError, OSError):
    """An output (a checkpoint, final weights) could not be written, e.g. the disk is full; nothing half-written
    is left under a real name."""
