r"""Dense FLOP-matched baseline (FFN d -> 2d -> d) at LibMoE's 660M LM setting.

Command:
  python -m moe_jax.main --config=configs/dense_660m.py --workdir=/tmp/dense_660m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/dense_660m.py:tiny --workdir=/tmp/dense_660m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (400k steps of 65,536 tokens).
Expected: validation PPL 11.51 at 400k steps (LibMoE notebook; the label
  reading is inferred, algorithms.md §8.1).
  The :tiny run: unknown.
Paper: LibMoE (arXiv 2411.00918) `preln_rope` dense baseline;
  algorithms.md §6.1.
Parameters: 129,769,280 trainable (algorithms.md §6.1: about 129.6M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The dense options and losses: moe_jax/router_recipes.py:dense.
  return router_recipes.experiment('dense', '660m', arg)
