"""Model families, built from an experiment config by name (big_vision).

    model = models.build(config)      # MODELS[config.model_name].from_config

Each family is a module with `from_config(config) -> flax Module`; it is the
one place that maps the config's sub-dicts onto the model's constructor
arguments. Adding a family (a Hugging Face architecture, a vision tower)
means adding its module and one entry to MODELS.

  decoder   decoder-only LM: LibMoE's LM stack, MoE or dense FFN per layer
  llava     vision-language model: a SigLIP / CLIP tower and an mlp2x_gelu
            projector (each dense or MoE) spliced into a decoder LLM
"""

from __future__ import annotations

import ml_collections

from moe_jax.models import attention_probe
from moe_jax.models import decoder
from moe_jax.models import llava
from moe_jax.moe import backend_probe

MODELS = {
    'decoder': decoder,
    'llava': llava,
}


def build(config: ml_collections.ConfigDict):
  """The flax model of `config` (MODELS[config.model_name].from_config).

  moe.backend='auto' is resolved first, in place (moe/backend_probe.py:
  blocked on a CPU, the Pallas kernel on a GPU if its start-up probe
  passes), so the config then names the backend the model runs; so is
  train.attention='auto' (models/attention_probe.py: cuDNN on a GPU in
  half precision if its probe passes, else XLA).
  """
  if config.model_name not in MODELS:
    raise ValueError(f'model_name: expected one of {sorted(MODELS)}, got '
                     f'{config.model_name!r}')
  backend_probe.resolve_config(config)
  attention_probe.resolve_config(config)
  return MODELS[config.model_name].from_config(config)


def uses_moe(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's model has MoE layers (routers, aux losses)."""
  return MODELS[config.model_name].uses_moe(config)
