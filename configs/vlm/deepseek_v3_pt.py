r"""Stage 1, pre-training (PT): the dense projector alone learns captions.

The dense stages are the same for every router; this file makes the
`deepseek_v3` pipeline three files. Recipe, data and the full-size command:
moe_jax/vlm_experiment.py and configs/vlm/deepseek_v3_sft.py. CPU quickstart:
  python -m moe_jax.main --config=configs/vlm/deepseek_v3_pt.py:tiny --workdir=/tmp/vlm_deepseek_v3_tiny/pt
"""

from moe_jax import vlm_experiment


def get_config(arg=None):
  return vlm_experiment.experiment('deepseek_v3', 'pt', arg)
