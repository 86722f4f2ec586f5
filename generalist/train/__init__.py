"""Multi-task training: the mixture sampler, checkpoints, the training loop and its report."""
