r"""ReMoE (ReLU routing, adaptive L1) at LibMoE's 660M LM setting.

Command:
  python -m moe_jax.main --config=configs/remoe_660m.py --workdir=/tmp/remoe_660m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/remoe_660m.py:tiny --workdir=/tmp/remoe_660m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (400k steps of 65,536 tokens).
Expected: unknown (LibMoE has no working LM ReMoE, D8).
  The :tiny run: unknown.
Paper: Wang, Zhu, Chen, "ReMoE: fully differentiable mixture-of-experts with
  ReLU routing", ICLR 2025 (arXiv 2412.14711); algorithms.md §3.11.
Parameters: 678,287,168 trainable (LibMoE: about 678.3M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The remoe options and losses: moe_jax/router_recipes.py:remoe.
  return router_recipes.experiment('remoe', '660m', arg)
