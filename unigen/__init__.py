"""unigen: unified multimodal models (Janus / Janus-Pro style) for understanding and generating images."""

from unigen.config import LLMConfig, SigLIPConfig, TokenIds, UniGenConfig, VQConfig
from unigen.generation.pipeline import UniGenPipeline
from unigen.generation.sampling import generate_image_tokens, generate_text
from unigen.models.model import UniGenModel
from unigen.processor import UniGenProcessor

__all__ = [
    "LLMConfig", "SigLIPConfig", "TokenIds", "UniGenConfig", "UniGenModel", "UniGenPipeline", "UniGenProcessor",
    "VQConfig", "generate_image_tokens", "generate_text",
]
