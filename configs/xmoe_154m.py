r"""XMoE (low-rank hypersphere cosine router) at LibMoE's 154M LM setting.

Command:
  python -m moe_jax.main --config=configs/xmoe_154m.py --workdir=/tmp/xmoe_154m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/xmoe_154m.py:tiny --workdir=/tmp/xmoe_154m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (100k steps of 65,536 tokens).
Expected: unknown (LibMoE reports XMoE LM numbers in the paper only, and its
  shipped XMoE yamls crash, D3).
  The :tiny run (200 steps, 2-core CPU, 25 s wall with start-up;
  2026-11-23): train loss 6.63 -> 2.54, validation PPL 16.83,
  next-token accuracy 0.300.
Paper: Chi et al. 2022, "On the representation collapse of sparse mixture of
  experts" (X-MoE, arXiv 2204.09179); algorithms.md §3.3. One softmax at
  temperature 0.3 (LibMoE's double softmax, D2, is a parity flag).
Parameters: 157,698,912 trainable (LibMoE: about 157.9M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The xmoe options and losses: moe_jax/router_recipes.py:xmoe.
  return router_recipes.experiment('xmoe', '154m', arg)
