r"""σ-MoE (sigmoid router) at LibMoE's 154M LM setting.

Command:
  python -m moe_jax.main --config=configs/sigmoid_154m.py --workdir=/tmp/sigmoid_154m
CPU quickstart (a few minutes on 2 cores, built-in synthetic corpus):
  python -m moe_jax.main --config=configs/sigmoid_154m.py:tiny --workdir=/tmp/sigmoid_154m_tiny

Hardware: one 80 GB GPU (H100); LibMoE ran 4 GPUs x 16 sequences. The mesh
  data axis takes every device; if a step does not fit, add
  --config.train.grad_accum=4.
  Point --config.data.train_path / eval_path at the SlimPajama parquet shards.
Runtime: not measured yet (100k steps of 65,536 tokens).
Expected: validation PPL 13.61 at 100k steps (preset libmoe; LibMoE,
  algorithms.md §8.1). Preset sigma_moe_csordas: unknown.
  The :tiny run (200 steps, 2-core CPU, 23 s wall with start-up;
  2026-11-23): train loss 6.62 -> 2.51, validation PPL 16.75,
  next-token accuracy 0.298.
Paper: Csordás et al. 2023, "Approximating two-layer feedforward networks for
  efficient transformers" (σ-MoE, arXiv 2310.10837); algorithms.md §3.2.
Parameters: 157,934,400 trainable (LibMoE: about 157.9M).

Arguments (`:key=value,...`):
  tiny: the CPU-sized model and run (synthetic data, float32, backend
    'blocked').
  preset=libmoe (default): LibMoE v2 sigmoid: renormalised top-k weights and
    the standard balance loss on the normalised sigmoid.
  preset=sigma_moe_csordas: all four of Csordás' choices: un-normalised
    weights, the batch-marginal entropy loss (0.001) instead of the balance
    loss, expert dropout 0.1, renorm_keep_std router init.
"""

from moe_jax import router_recipes


def get_config(arg=None):
  # The sigmoid options and losses: moe_jax/router_recipes.py:sigmoid.
  return router_recipes.experiment('sigmoid', '154m', arg)
