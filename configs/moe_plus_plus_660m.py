r"""MoE++ (zero / copy / constant experts) at LibMoE's 660M LM setting.

Command:
  python -m moe_jax.main --config=configs/moe_plus_plus_660m.py --workdir=/tmp/moe_plus_plus_660m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/moe_plus_plus_660m.py:tiny --workdir=/tmp/moe_plus_plus_660m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (400k steps of 65,536 tokens).
Expected: unknown (LibMoE's LM MoE++ layer cannot run, D1; its paper numbers are
  not in the repository).
  The :tiny run: unknown.
Paper: Jin et al., "MoE++: accelerating mixture-of-experts methods with
  zero-computation experts" (arXiv 2410.07348); algorithms.md §3.9.
Parameters: 678,864,968 trainable (LibMoE: about 678.3M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
  preset=libmoe (default): LibMoE's intended LM layout, 1 zero / 1 copy /
    6 constant experts beside the FFN experts, linear router.
  preset=reference: the reference code's 1 / 1 / 2 with its 2-layer router.
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The moe_plus_plus options and losses: moe_jax/router_recipes.py:moe_plus_plus.
  return router_recipes.experiment('moe_plus_plus', '660m', arg)
