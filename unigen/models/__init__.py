"""The networks: the decoder, the unified model around it, the VQ image tokenizer, the vision encoders and Method B's
cross-attention blocks, and the checkpoint files they load from and save to."""
