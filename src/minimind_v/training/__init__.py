"""Training: the one loop for every stage, checkpoints and resume, the image-feature cache."""
