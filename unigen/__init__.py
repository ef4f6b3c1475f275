"""unigen: unified multimodal models (Janus / Janus-Pro style) for understanding and generating images."""

from unigen.config import LLMConfig, SigLIPConfig, TokenIds, UniGenConfig, VQConfig
from unigen.model import UniGenModel
from unigen.pipeline import UniGenPipeline
from unigen.processor import UniGenProcessor
from unigen.sampling import generate_image_tokens, generate_text

__all__ = [
    "LLMConfig", "SigLIPConfig", "TokenIds", "UniGenConfig", "UniGenModel", "UniGenPipeline", "UniGenProcessor",
    "VQConfig", "generate_image_tokens", "generate_text",
]
