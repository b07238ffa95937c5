"""Pallas kernels (GPU/TPU) for MoE dispatch and grouped expert matmuls.

Optional: moe_jax has pure-JAX fallbacks for everything here. A leaf: these
modules import only JAX; moe_jax/moe/backends.py adapts gmm to the expert
backend contract as 'pallas'.

  gmm.py      grouped matmul gmm / tgmm (Pallas, Triton lowering), their
              loop references, and grouped_matmul with its custom VJP.
  bench.py    `python -m kernels_pallas.bench`: TFLOP/s on a GPU, an
              interpret-mode correctness check without one.
"""
