r"""Stage 2, pre-fine-tuning (PFT): everything dense trains.

The dense stages are the same for every router; this file makes the
`sigmoid` pipeline three files. Recipe, data and the full-size command:
moe_jax/vlm_experiment.py and configs/vlm/sigmoid_sft.py. CPU quickstart:
  python -m moe_jax.main --config=configs/vlm/sigmoid_pft.py:tiny --workdir=/tmp/vlm_sigmoid_tiny/pft --config.init.previous_stage=/tmp/vlm_sigmoid_tiny/pt
"""

from moe_jax import vlm_experiment


def get_config(arg=None):
  return vlm_experiment.experiment('sigmoid', 'pft', arg)
