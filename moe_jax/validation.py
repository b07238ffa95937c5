"""The one way moe_jax reports a bad setting: a ValueError naming the field.

    require(k <= e, 'top_k', f'at most num_experts={e}', k)
    -> ValueError: top_k: expected at most num_experts=8, got 9

Lower layers name their own argument ('top_k'); the code that maps a config
onto them adds the config path in front ('moe.router_options.top_k: ...').
"""

from __future__ import annotations

from typing import Any


def require(ok: bool, field: str, expected: str, got: Any) -> None:
  """Raises ValueError('<field>: expected <expected>, got <got!r>') if not ok."""
  if not ok:
    raise ValueError(f'{field}: expected {expected}, got {got!r}')


class ConfigMismatch(ValueError):
  """The config describes a different model than the workdir's checkpoints.

  Raised before anything in the workdir is changed; the message names the
  config fields that differ from the run's config.json.
  """
