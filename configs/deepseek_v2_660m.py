r"""DeepSeek-V2-style shared expert (SharedE-V2) at LibMoE's 660M LM setting.

Command:
  python -m moe_jax.main --config=configs/deepseek_v2_660m.py --workdir=/tmp/deepseek_v2_660m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/deepseek_v2_660m.py:tiny --workdir=/tmp/deepseek_v2_660m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (400k steps of 65,536 tokens).
Expected: validation PPL 9.52 at 400k steps (LibMoE, algorithms.md §8.1).
  The :tiny run: unknown.
Paper: DeepSeek-AI, "DeepSeek-V2" (arXiv 2405.04434) and DeepSeekMoE (arXiv
  2401.06066); LibMoE `moe_layer_deepseekv2.py`; algorithms.md §3.7.
Parameters: 678,250,304 trainable (LibMoE: about 678.3M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The deepseek_v2 options and losses: moe_jax/router_recipes.py:deepseek_v2.
  return router_recipes.experiment('deepseek_v2', '660m', arg)
