"""Model families, built from an experiment config by name (big_vision).

    model = models.build(config)      # MODELS[config.model_name].from_config

Each family is a module with `from_config(config) -> flax Module`; it is the
one place that maps the config's sub-dicts onto the model's constructor
arguments. Adding a family (a Hugging Face architecture, a vision tower)
means adding its module and one entry to MODELS.

  decoder   decoder-only LM: LibMoE's LM stack, MoE or dense FFN per layer
"""

from __future__ import annotations

import ml_collections

from moe_jax.models import decoder

MODELS = {
    'decoder': decoder,
}


def build(config: ml_collections.ConfigDict):
  """The flax model of `config` (MODELS[config.model_name].from_config)."""
  if config.model_name not in MODELS:
    raise ValueError(f'model_name: expected one of {sorted(MODELS)}, got '
                     f'{config.model_name!r}')
  return MODELS[config.model_name].from_config(config)
