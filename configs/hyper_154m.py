r"""HyperRouter (Hyper-R) at LibMoE's 154M LM setting.

Command:
  python -m moe_jax.main --config=configs/hyper_154m.py --workdir=/tmp/hyper_154m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/hyper_154m.py:tiny --workdir=/tmp/hyper_154m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (100k steps of 65,536 tokens).
Expected: unknown (LibMoE has HyperRouter in its VLM stack only).
  The :tiny run (200 steps, 2-core CPU, 23 s wall with start-up;
  2026-11-23): train loss 6.58 -> 2.53, validation PPL 17.26,
  next-token accuracy 0.302.
Paper: Do et al., "HyperRouter: towards efficient training and inference of
  sparse mixture of experts", EMNLP 2023; LibMoE v1.1 `hyperrouter.py`;
  algorithms.md §3.6.
Parameters: 157,401,920 trainable (LibMoE: about 157.9M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The hyper options and losses: moe_jax/router_recipes.py:hyper.
  return router_recipes.experiment('hyper', '154m', arg)
