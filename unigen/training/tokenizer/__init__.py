"""Training tasks for the two visual tokenizers of a unified model (see ``tokenizers/`` for recipes), run by the
one loop (``unigen.training.engine``).

* ``trainer``        the tokenizer tasks' shared set-up, resume and checkpoints
* ``vq_trainer``     LlamaGen VQ-16 image tokenizer for the generation path (``model.gen_vision_model``)
* ``siglip_trainer`` small SigLIP image encoder trained from scratch with the sigmoid image-text loss,
                     for the understanding path (``model.vision_model``)
* ``losses``, ``side_by_side``, ``shapes_recon``, ``vq_codes``, ``run_checks``, ``common``: their parts
"""

from unigen.training.tokenizer.siglip_trainer import (
    SigLIPTrainConfig,
    load_siglip,
    load_siglip_into,
    train_siglip,
)
from unigen.training.tokenizer.vq_trainer import VQTrainConfig, load_vq, load_vq_into, save_vq, train_vq

__all__ = [
    "SigLIPTrainConfig",
    "VQTrainConfig",
    "load_siglip",
    "load_siglip_into",
    "load_vq",
    "load_vq_into",
    "save_vq",
    "train_siglip",
    "train_vq",
]
