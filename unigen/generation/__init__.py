"""Inference: prompts in, images and text out (sampling, the image-token decoders, editing, chat, the pipeline)."""
