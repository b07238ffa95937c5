r"""Sparse upcycling of a dense Qwen2 / Qwen2.5 model with the smoe router.

Command (any dense Qwen2 / Qwen2.5 Hugging Face directory):
  python -m moe_jax.main --config=configs/upcycle/qwen2_smoe.py --config.init.hf_path=DIR --workdir=/tmp/qwen2_smoe
CPU quickstart (a tiny random model written first, then 100 steps):
  python -m moe_jax.convert tiny --family=qwen2 --out=/tmp/tiny_qwen2
  python -m moe_jax.main --config=configs/upcycle/qwen2_smoe.py:tiny --config.init.hf_path=/tmp/tiny_qwen2 --workdir=/tmp/qwen2_smoe_tiny

Hardware: one GPU for 1B-8B models (add --config.train.grad_accum); the tiny
  variant runs on a 2-core CPU.
Runtime: not measured yet.
Expected: step-0 loss equal to the dense model's (the upcycled model computes
  its function: every expert is the dense MLP and the router weights sum to 1); the loss then falls below it.
Export: Qwen2-MoE (q/k/v biases).
Paper: Komatsuzaki et al. 2023, "Sparse upcycling" (arXiv 2212.05055);
  LibMoE (arXiv 2411.00918) §10 of algorithms.md.

Arguments (`:key=value,...`): tiny; train_only=all|moe (moe_jax/upcycle_experiment.py).
"""

from moe_jax import upcycle_experiment


def get_config(arg=None):
  return upcycle_experiment.experiment('smoe', arg)
