r"""SMoE (softmax top-k) at LibMoE's 660M LM setting.

Command:
  python -m moe_jax.main --config=configs/smoe_660m.py --workdir=/tmp/smoe_660m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/smoe_660m.py:tiny --workdir=/tmp/smoe_660m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (400k steps of 65,536 tokens).
Expected: validation PPL 9.51 at 400k steps (LibMoE, algorithms.md §8.1; 15.20
  at 20k).
  The :tiny run: unknown.
Paper: Shazeer et al. 2017, "Outrageously large neural networks" (arXiv
  1701.06538); the LibMoE baseline (arXiv 2411.00918), algorithms.md §3.1.
Parameters: 678,287,168 trainable (LibMoE: about 678.3M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The smoe options and losses: moe_jax/router_recipes.py:smoe.
  return router_recipes.experiment('smoe', '660m', arg)
