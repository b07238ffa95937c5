r"""DeepSeek-V3-style router (SharedE-V3) at LibMoE's 660M LM setting.

Command:
  python -m moe_jax.main --config=configs/deepseek_v3_660m.py --workdir=/tmp/deepseek_v3_660m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/deepseek_v3_660m.py:tiny --workdir=/tmp/deepseek_v3_660m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (400k steps of 65,536 tokens).
Expected: preset deepseek_v3_full (default): unknown. Preset sharede_v3_libmoe:
  validation PPL 9.49 at 400k steps (LibMoE, algorithms.md §8.1; which run
  produced that row is uncertain, §3.8).
  The :tiny run: unknown.
Paper: DeepSeek-AI, "DeepSeek-V3 technical report" (arXiv 2412.19437);
  algorithms.md §3.8.
Parameters: 678,250,304 trainable (LibMoE: about 678.3M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
  preset=deepseek_v3_full (default): aux-loss-free bias (gamma 0.001) and the
    complementary sequence-wise loss at the paper's alpha 0.0001.
  preset=sharede_v3_libmoe: the layer behind LibMoE's V3 row: no bias, no
    groups, balance alpha 0.01.
  n_group=8,topk_group=4: group-limited routing (DeepSeek-V3's constants).
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The deepseek_v3 options and losses: moe_jax/router_recipes.py:deepseek_v3.
  return router_recipes.experiment('deepseek_v3', '660m', arg)
