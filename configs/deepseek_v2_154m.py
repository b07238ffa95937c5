r"""DeepSeek-V2-style shared expert (SharedE-V2) at LibMoE's 154M LM setting.

Command:
  python -m moe_jax.main --config=configs/deepseek_v2_154m.py --workdir=/tmp/deepseek_v2_154m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/deepseek_v2_154m.py:tiny --workdir=/tmp/deepseek_v2_154m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (100k steps of 65,536 tokens).
Expected: validation PPL 13.49 at 100k steps (LibMoE, algorithms.md §8.1).
  The :tiny run (200 steps, 2-core CPU, 21 s wall with start-up;
  2026-11-23): train loss 6.79 -> 2.45, validation PPL 15.66,
  next-token accuracy 0.310.
Paper: DeepSeek-AI, "DeepSeek-V2" (arXiv 2405.04434) and DeepSeekMoE (arXiv
  2401.06066); LibMoE `moe_layer_deepseekv2.py`; algorithms.md §3.7.
Parameters: 157,918,016 trainable (LibMoE: about 157.9M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The deepseek_v2 options and losses: moe_jax/router_recipes.py:deepseek_v2.
  return router_recipes.experiment('deepseek_v2', '154m', arg)
