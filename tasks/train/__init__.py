"""Training: the loop, checkpoints, progress, and sweeps over settings."""
