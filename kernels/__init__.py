"""Triton kernels of the chunk step, one file per op, each beside a torch reference of the same signature.

Importing a kernel module needs `triton`; `sfpp.ops` imports them lazily and falls back to the references.
With TRITON_INTERPRET=1 (and numpy) the kernels run on CPU tensors, which is how the CPU tests exercise them.
"""
