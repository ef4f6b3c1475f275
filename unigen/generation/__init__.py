"""Inference: prompts in, images and text out (sampling, the image-token decoders, editing, the pipeline); every
prompt is built by unigen.prompts."""
