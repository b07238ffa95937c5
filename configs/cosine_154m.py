r"""Cosine router (Cosine-R) at LibMoE's 154M LM setting.

Command:
  python -m moe_jax.main --config=configs/cosine_154m.py --workdir=/tmp/cosine_154m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/cosine_154m.py:tiny --workdir=/tmp/cosine_154m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (100k steps of 65,536 tokens).
Expected: unknown (LibMoE has Cosine-R in its VLM stack only).
  The :tiny run (200 steps, 2-core CPU, 26 s wall with start-up;
  2026-11-23): train loss 6.65 -> 2.52, validation PPL 16.54,
  next-token accuracy 0.301.
Paper: Nguyen et al., "Statistical advantages of perturbing cosine router in
  mixture of experts" (arXiv 2405.14131); Chi et al. 2022 (arXiv 2204.09179);
  LibMoE v1.1 `moe_cosinegating.py`; algorithms.md §3.4.
Parameters: 157,935,456 trainable (LibMoE: about 157.9M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The cosine options and losses: moe_jax/router_recipes.py:cosine.
  return router_recipes.experiment('cosine', '154m', arg)
