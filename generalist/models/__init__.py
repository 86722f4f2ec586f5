"""Models: the generalist encoder-decoder, its config/presets, and decoding."""
