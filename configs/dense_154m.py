r"""Dense FLOP-matched baseline (FFN d -> 2d -> d) at LibMoE's 154M LM setting.

Command:
  python -m moe_jax.main --config=configs/dense_154m.py --workdir=/tmp/dense_154m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/dense_154m.py:tiny --workdir=/tmp/dense_154m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (100k steps of 65,536 tokens).
Expected: validation PPL 17.04 at 100k steps (LibMoE router_saturation_plot
  notebook, algorithms.md §8.1; 24.60 at 10k).
  The :tiny run (200 steps, 2-core CPU, 16 s wall with start-up;
  2026-11-23): train loss 6.72 -> 2.41, validation PPL 14.92,
  next-token accuracy 0.329.
Paper: LibMoE (arXiv 2411.00918) `preln_rope` dense baseline;
  algorithms.md §6.1.
Parameters: 35,783,488 trainable (algorithms.md §6.1: about 35.8M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The dense options and losses: moe_jax/router_recipes.py:dense.
  return router_recipes.experiment('dense', '154m', arg)
