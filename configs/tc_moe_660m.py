r"""TC-MoE (ternary expert choice) at LibMoE's 660M LM setting.

Command:
  python -m moe_jax.main --config=configs/tc_moe_660m.py --workdir=/tmp/tc_moe_660m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/tc_moe_660m.py:tiny --workdir=/tmp/tc_moe_660m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (400k steps of 65,536 tokens).
Expected: unknown (LibMoE's LM TC-MoE crashes, D7/D7b; its paper numbers are not
  in the repository).
  The :tiny run: unknown.
Paper: Yan et al., "TC-MoE: augmenting mixture of experts with ternary expert
  choice", ICLR 2025 (code: stiger1000/TC-MoE); algorithms.md §3.10.
Parameters: 679,651,136 trainable (LibMoE: about 678.3M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The tc_moe options and losses: moe_jax/router_recipes.py:tc_moe.
  return router_recipes.experiment('tc_moe', '660m', arg)
