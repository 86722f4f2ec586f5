"""Raw kernels (Triton in kernels/triton/, C++ and CUDA in csrc/ via generalist._C).

No autograd and no input validation beyond layout: generalist.ops wraps every kernel in a
registered op. Model code never imports from here.
"""
