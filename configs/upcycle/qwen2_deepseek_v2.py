r"""Sparse upcycling of a dense Qwen2 / Qwen2.5 model with the deepseek_v2 router.

Command (any dense Qwen2 / Qwen2.5 Hugging Face directory):
  python -m moe_jax.main --config=configs/upcycle/qwen2_deepseek_v2.py --config.init.hf_path=DIR --workdir=/tmp/qwen2_deepseek_v2
CPU quickstart (a tiny random model written first, then 100 steps):
  python -m moe_jax.convert tiny --family=qwen2 --out=/tmp/tiny_qwen2
  python -m moe_jax.main --config=configs/upcycle/qwen2_deepseek_v2.py:tiny --config.init.hf_path=/tmp/tiny_qwen2 --workdir=/tmp/qwen2_deepseek_v2_tiny

Hardware: one GPU for 1B-8B models (add --config.train.grad_accum); the tiny
  variant runs on a 2-core CPU.
Runtime: not measured yet.
Expected: step-0 loss equal to the dense model's (the upcycled model computes
  its function: every expert is the dense MLP and the shared expert mixed 0.5 / 0.5); the loss then falls below it.
Export: Qwen2-MoE (shared expert gate 0, routed halves).
Paper: Komatsuzaki et al. 2023, "Sparse upcycling" (arXiv 2212.05055);
  LibMoE (arXiv 2411.00918) §10 of algorithms.md.

Arguments (`:key=value,...`): tiny; train_only=all|moe (moe_jax/upcycle_experiment.py).
"""

from moe_jax import upcycle_experiment


def get_config(arg=None):
  return upcycle_experiment.experiment('deepseek_v2', arg)
