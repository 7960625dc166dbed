"""The kernels floor: Triton kernels of the chunk step, one file per op (ring_attention.py, cache_write.py,
adaln.py), their torch references (reference.py: what each op means, and the CPU backend), the fp8 format they share
(fp8.py) and the compiled CUDA C++ ops (`_cuda_ops`, built from csrc/ when nvcc is present). Imports torch and
triton only. A Triton module needs `triton` to import; `sfpp.engine.ops` imports them on first use and falls back to
the references. With TRITON_INTERPRET=1 (and numpy) the kernels run on CPU tensors, which is how the CPU tests
exercise them.
"""
