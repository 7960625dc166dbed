"""The engine floor: the streaming core, independent of which model runs in it. The ring-buffer KV cache (cache.py),
RoPE math (rope.py), the per-op kernel dispatch (ops.py), the block-causal attention of training (attention.py),
the flow-matching sampler and its one denoising loop (sampler.py), the chunk runner with CUDA graphs (graph.py), and
a stream's state and iteration (stream.py). Imports `sfpp.kernels` only."""
