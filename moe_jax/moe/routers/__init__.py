"""Routing algorithms, one module per family; `moe_jax.moe.router` registers them."""
