"""Pallas kernels (GPU/TPU) for MoE dispatch and grouped expert matmuls.

Optional: moe_jax has pure-JAX fallbacks for everything here.
"""
