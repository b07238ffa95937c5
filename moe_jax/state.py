"""The train state, its optimiser and schedule, and its construction.

`TrainState` is everything a train step reads and writes and a checkpoint
holds. The optimiser (AdamW after global-norm clipping) and LibMoE's schedule
live here too, so that training builds them and nothing else needs to:
evaluation, tracing and conversion restore parameters with `restore.py`,
which never constructs an optimiser.

Dimension legend: L layers.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from moe_jax import models
from moe_jax.moe import router as router_lib

ConfigDict = ml_collections.ConfigDict

# train.trainable that trains everything (LibMoE pretraining).
ALL_TRAINABLE = ('.*',)


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  step: completed optimiser steps (int32 scalar).
  params: trainable parameters.
  opt_state: optax state.
  router_state: the model's 'router_state' collection ({} if none).
  router_hook: the router's per-step state kept by the train step
    (`RouterSpec.step_hook`; ReMoE: {'lambda': [L]}), {} for routers
    without a hook.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  router_state: Any
  router_hook: Any


def learning_rate_schedule(train: ConfigDict) -> optax.Schedule:
  """LibMoE's schedule (algorithms.md §6.2): linear warmup, then cosine.

  The cosine is evaluated at (step - warmup) with period `cosine_steps`
  (LibMoE: T_max = steps even with warmup) and floor min_lr_ratio · lr.
  """
  peak = train.learning_rate
  if train.schedule == 'constant':
    main = optax.constant_schedule(peak)
  else:
    main = optax.cosine_decay_schedule(peak, train.cosine_steps,
                                       alpha=train.min_lr_ratio)
  if not train.warmup_steps:
    return main
  warmup = optax.linear_schedule(0.0, peak, train.warmup_steps)
  return optax.join_schedules([warmup, main], [train.warmup_steps])


def param_path(path) -> str:
  """'layer_0/moe/experts/w_in' for a jax tree path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def trainable_labels(params, patterns) -> Any:
  """'train' / 'freeze' per parameter: trains when a regex matches its path.

  A parameter still in its logical-partitioning box (optimizer.init runs on
  the boxed tree) gets one label for the whole box, as its unboxed array
  does at update time: the optimiser state then has the same structure
  either way.
  """
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: ('train' if any(c.fullmatch(param_path(path))
                                      for c in compiled) else 'freeze'),
      params, is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))


def make_optimizer(train: ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping, then AdamW with decay on all trained parameters.

  With `train.trainable` other than ('.*',) the frozen parameters get no
  update at all (no decay either) and the clipping norm covers the trained
  ones only; the optimiser state then has optax.multi_transform's layout.
  """
  schedule = learning_rate_schedule(train)
  tx = optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps,
                  weight_decay=train.weight_decay))
  patterns = tuple(train.trainable)
  if patterns == ALL_TRAINABLE:
    return tx, schedule
  return optax.multi_transform(
      {'train': tx, 'freeze': optax.set_to_zero()},
      lambda params: trainable_labels(params, patterns)), schedule


def step_hook(config: ConfigDict) -> router_lib.StepHook | None:
  """The config's router step hook (ReMoE's λ), or None."""
  if not models.uses_moe(config):
    return None
  return router_lib.ROUTERS[config.moe.router].step_hook


def init_variables(key: jax.Array, *, model, seq_len: int) -> dict:
  """model.init on a [1, seq_len] batch; params keep their logical boxes.

  A model with inputs beyond the tokens (the VLM's images) names them in
  its `example_inputs(seq_len)` method.
  """
  if hasattr(model, 'example_inputs'):
    inputs = model.example_inputs(seq_len)
  else:
    inputs = {'tokens': jnp.zeros((1, seq_len), jnp.int32)}
  params_key, router_key = jax.random.split(key)
  return model.init({'params': params_key, 'router': router_key}, **inputs,
                    train=False)


def init_state(key: jax.Array, *, model,
               optimizer: optax.GradientTransformation,
               config: ConfigDict) -> TrainState:
  """A fresh TrainState; parameters keep their logical boxes (unbox later)."""
  variables = init_variables(key, model=model, seq_len=config.train.seq_len)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=optimizer.init(params),
      router_state=dict(variables.get('router_state', {})),
      router_hook=init_router_hook(config))


def hook_options(config: ConfigDict) -> dict:
  """The router step hook's settings ({} without a hook), plain values."""
  hook = step_hook(config)
  if hook is None:
    return {}
  return config.loss[hook.options_key].to_dict()


def init_router_hook(config: ConfigDict) -> Any:
  """The initial router-hook state of the config's router ({} for none)."""
  hook = step_hook(config)
  if hook is None:
    return {}
  return hook.init(router_config(config), config.model.num_layers,
                   hook_options(config))


def router_config(config: ConfigDict) -> router_lib.RouterConfig:
  """The validated RouterConfig of the config's MoE layers."""
  return router_lib.make_config(
      config.moe.router, num_experts=config.moe.num_experts,
      top_k=config.moe.top_k, d_model=config.moe.d_model,
      **config.moe.router_options.to_dict())


# ----------------------------------------------------------------------------
# Checkpoints written before the router hook existed.

# Until commit 821ade2, TrainState had `remoe_lambda` [L] for every router
# (ones unless the router was ReMoE) instead of `router_hook`.
LEGACY_FIELD = 'remoe_lambda'


@flax.struct.dataclass
class LegacyTrainState:
  """TrainState as checkpoints before the router hook stored it."""

  step: jax.Array
  params: Any
  opt_state: Any
  router_state: Any
  remoe_lambda: jax.Array


def legacy_abstract(abstract: TrainState, num_layers: int) -> LegacyTrainState:
  """The legacy layout of an abstract TrainState (same shardings)."""
  sharding = getattr(abstract.step, 'sharding', None)
  return LegacyTrainState(
      step=abstract.step, params=abstract.params,
      opt_state=abstract.opt_state, router_state=abstract.router_state,
      remoe_lambda=jax.ShapeDtypeStruct((num_layers,), jnp.float32,
                                        sharding=sharding))


def from_legacy(legacy: LegacyTrainState, hook_state: Any) -> TrainState:
  """A TrainState from a legacy one; `hook_state` is the current layout's.

  ReMoE's λ moves into {'lambda': [L]}; other routers drop the unused ones.
  """
  if isinstance(hook_state, dict) and 'lambda' in hook_state:
    hook_state = {**hook_state, 'lambda': legacy.remoe_lambda}
  return TrainState(step=legacy.step, params=legacy.params,
                    opt_state=legacy.opt_state,
                    router_state=legacy.router_state, router_hook=hook_state)
