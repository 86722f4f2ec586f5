"""Loads the compiled extension generalist._C when it was built; the package works without it.

Importing `_C` registers its kernels (csrc/) with torch.library. `torch` is imported first so
the extension finds the torch libraries it links against already loaded.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from generalist import _C
except ImportError as error:  # not built, or built against another torch
    _C = None
    import_error: ImportError | None = error
else:
    import_error = None


def has_extension() -> bool:
    """Whether generalist._C is importable (its CPU kernels are then registered)."""
    return _C is not None


def cuda_built() -> bool:
    """Whether generalist._C was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built())
