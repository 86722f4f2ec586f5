"""Examples, their encoding into model inputs, and packing into varlen streams."""
