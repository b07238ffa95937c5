"""Analysis of routing traces (moe_jax/trace.py); algorithms.md §9."""
