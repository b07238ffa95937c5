r"""SMoE (softmax top-k) at LibMoE's 154M LM setting.

Command:
  python -m moe_jax.main --config=configs/smoe_154m.py --workdir=/tmp/smoe_154m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/smoe_154m.py:tiny --workdir=/tmp/smoe_154m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (100k steps of 65,536 tokens).
Expected: validation PPL 13.63 at 100k steps (LibMoE, algorithms.md §8.1; 20.62
  at 10k).
  The :tiny run (200 steps, 2-core CPU, 25 s wall with start-up;
  2026-11-23): train loss 6.62 -> 2.52, validation PPL 16.40,
  next-token accuracy 0.308.
Paper: Shazeer et al. 2017, "Outrageously large neural networks" (arXiv
  1701.06538); the LibMoE baseline (arXiv 2411.00918), algorithms.md §3.1.
Parameters: 157,934,400 trainable (LibMoE: about 157.9M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
  demo: LibMoE's 1,000-step demo run (D16); expected PPL 89.70 (assets/
    result-paper-table.csv, algorithms.md §8.1).
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The smoe options and losses: moe_jax/router_recipes.py:smoe.
  return router_recipes.experiment('smoe', '154m', arg)
