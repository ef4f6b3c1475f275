"""Image-token decoders: one pass per token (``sequential``) or several (``jacobi``, ``zipar``).

Each method is a function ``decode(rows: GuidedRows, ...) -> codes`` over the same guided batch (a conditional
and an unconditional row per image in one static cache); :func:`unigen.generation.sampling.generate_image_tokens` picks
one by name. Options and their checks live in :mod:`unigen.generation.decoding.options`.
"""

from unigen.generation.decoding.draw import filter_logits, pick_tokens
from unigen.generation.decoding.guided import GuidedRows
from unigen.generation.decoding.options import DECODING_METHODS, JacobiOptions, ZipAROptions, decoding_options

__all__ = ["DECODING_METHODS", "GuidedRows", "JacobiOptions", "ZipAROptions", "decoding_options", "filter_logits",
           "pick_tokens"]
