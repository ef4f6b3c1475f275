"""unigen: unified multimodal models (Janus / Janus-Pro style) for understanding and generating images."""

from unigen.config import LLMConfig, SigLIPConfig, TokenIds, UniGenConfig, VQConfig
from unigen.model import UniGenModel

__all__ = ["LLMConfig", "SigLIPConfig", "TokenIds", "UniGenConfig", "UniGenModel", "VQConfig"]
