"""generalist: one sparse mixture-of-experts transformer for text, images, audio, video and
tables, running on attention kernels the project owns.

Importing the package needs only torch: the compiled extension (generalist._C), Triton and a
GPU are optional and used when present.
"""

__version__ = "0.1.0"
