"""Triton kernels. Importing this package never needs a GPU; launching needs one or
TRITON_INTERPRET=1."""
