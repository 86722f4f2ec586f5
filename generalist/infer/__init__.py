"""Inference: one entry point (Generalist) for every task and modality."""
