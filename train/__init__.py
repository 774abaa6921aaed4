"""Training: Hydra entry, DeepSpeed engine, checkpoints, curriculum, tracking, sampling."""
