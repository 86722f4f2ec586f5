"""Layers built on generalist.ops: attention, mixture-of-experts feed-forward, transformer blocks."""
