"""Models: per-modality encoders, fusion modules, heads and the multimodal model."""
