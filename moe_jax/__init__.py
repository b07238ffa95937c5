"""moe_jax: train, compare and dissect Mixture-of-Experts language models in JAX/Flax."""
