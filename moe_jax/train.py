"""Pretraining: `train_and_evaluate(config, workdir)` and its jitted steps.

One optimiser step (`train_step`):
  1. split the global batch into `train.grad_accum` micro-batches; for each,
     loss = CE + Σ_name coef_name · reduce_layers(scale_name · aux_name)
     (scales from the router's step hook: ReMoE's adaptive λ on its L1),
     gradients by value_and_grad;
  2. AdamW (optax) on the mean gradient, after global-norm clipping;
  3. the router's post-update from the step's statistics (DeepSeek-V3 bias
     from expert counts summed over micro-batches, XMoE norm projection);
  4. the router's step hook from the step's statistics (ReMoE's λ from the
     sparsity, algorithms.md §3.11).
Router logits, softmax and every loss are float32 (the layer does that);
matmuls run in `train.dtype`.

The step RNG is fold_in(seed, step), so a resumed run draws the same noise.
This module is a consumer: the state, optimiser and schedule live in
state.py, scoring in scoring.py, data in data/from_config.py; nothing but
main.py and the benchmarks imports it.

Dimension legend: G global batch, A micro-batches, B = G / A, S sequence, V
vocabulary, L layers, E' router width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Any, Iterator

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from eval import tasks as tasks_lib
from eval import text_scorer as text_scorer_lib
from eval import zero_shot
from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config_lib
from moe_jax import flops as flops_lib
from moe_jax import loglikelihood
from moe_jax import models
from moe_jax import restore
from moe_jax import run_log as run_log_lib
from moe_jax import scoring
from moe_jax import sharding as sharding_lib
from moe_jax import state as state_lib
from moe_jax.analysis import tracing
from moe_jax.convert import init_from_hf
from moe_jax.convert import init_vlm
from moe_jax.data import from_config
from moe_jax.models import attention_probe
from moe_jax.moe import backend_probe
from moe_jax.moe import metrics as metrics_lib
from moe_jax.moe import router as router_lib
from moe_jax.state import TrainState

ConfigDict = ml_collections.ConfigDict


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm became NaN or infinite."""


# ----------------------------------------------------------------------------
# Losses and routing statistics.

def stack_layers(auxes: list[dict], part: str) -> dict[str, jax.Array]:
  """aux[part] of every layer, stacked: {name: [L, ...]}."""
  if not auxes or not auxes[0][part]:
    return {}
  return {name: jnp.stack([a[part][name] for a in auxes])
          for name in auxes[0][part]}


def reduce_layers(per_layer: jax.Array, reduction: str,
                  groups: tuple[tuple[int, int], ...] | None = None
                  ) -> jax.Array:
  """[L] -> scalar: `reduction` ('sum' | 'mean') within each group of layers
  (slices [start, stop) of the aux list), summed over the groups.

  One group for a decoder; the VLM has two, its vision tower (every layer
  at every S² scale) and its projector, as LibMoE adds the mean over the
  tower's layers to the projector's loss (algorithms.md §2.3c).
  """
  groups = groups or ((0, per_layer.shape[0]),)
  reduce = jnp.sum if reduction == 'sum' else jnp.mean
  return sum(reduce(per_layer[start:stop]) for start, stop in groups)


def weighted_aux_loss(layer_losses: dict[str, jax.Array],
                      coefficients: dict[str, float], reduction: str,
                      loss_scales: dict[str, jax.Array],
                      groups: tuple[tuple[int, int], ...] | None = None
                      ) -> jax.Array:
  """Σ_name coef · reduce_L(scale_name [L] · loss_name [L]).

  loss_scales: per-layer multipliers from the router's step hook (ReMoE's
  λ for 'remoe_l1'); losses without one are unscaled. groups: see
  reduce_layers.
  """
  total = jnp.zeros((), jnp.float32)
  for name, coefficient in coefficients.items():
    per_layer = layer_losses[name]                                # [L]
    if name in loss_scales:
      per_layer = per_layer * loss_scales[name]
    total = total + coefficient * reduce_layers(per_layer, reduction, groups)
  return total


def _get(tree, path):
  for key in path:
    # An int is an index into arrays stacked on a leading layer axis
    # (train.layer_loop='scan', decoder.router_paths).
    tree = (jax.tree.map(lambda a, i=key: a[i], tree) if isinstance(key, int)
            else tree[key])
  return tree


def _set(tree, path, value):
  if not path:
    return value
  if isinstance(path[0], int):
    new = _set(_get(tree, path[:1]), path[1:], value)
    return jax.tree.map(lambda a, v: a.at[path[0]].set(v), tree, new)
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def router_post_update(params, router_state, expert_counts, *, spec,
                       router_config, router_paths):
  """Applies the router's post_update to every router; counts [L, E'].

  router_paths[i] is the router of aux entry i; a router called more than
  once per step (the VLM tower at each S² scale) is updated once, from
  the counts of all its calls.
  """
  for path in dict.fromkeys(router_paths):
    calls = [i for i, p in enumerate(router_paths) if p == path]
    counts = sum(expert_counts[i] for i in calls)
    layer_state = (_get(router_state, path) if router_state else {})
    new_params, new_state = spec.post_update(
        _get(params, path), layer_state, {'expert_counts': counts},
        router_config)
    params = _set(params, path, new_params)
    if router_state:
      router_state = _set(router_state, path, new_state)
  return params, router_state


# ----------------------------------------------------------------------------
# Steps.

@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the jitted steps need from the config (plain values)."""

  coefficients: dict[str, float]
  layer_reduction: str
  grad_accum: int
  seed: int
  # The router behind each entry of the model's aux list, and the groups
  # of entries whose losses are reduced together (train.reduce_layers).
  router_paths: tuple[tuple[str | int, ...], ...]
  aux_groups: tuple[tuple[int, int], ...]
  router: str | None
  router_config: Any
  # The router's step hook and its settings (None / {} without one).
  hook: router_lib.StepHook | None = None
  hook_options: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_config(cls, config: ConfigDict, model) -> 'StepSettings':
    router, router_config = None, None
    if models.uses_moe(config):
      router = config.moe.router
      router_config = state_lib.router_config(config)
    return cls(coefficients=dict(config.loss.coefficients),
               layer_reduction=config.loss.layer_reduction,
               grad_accum=config.train.grad_accum, seed=config.train.seed,
               router_paths=tuple(model.router_paths()),
               aux_groups=tuple(model.aux_groups()), router=router,
               router_config=router_config,
               hook=state_lib.step_hook(config),
               hook_options=state_lib.hook_options(config))

  def loss_scales(self, hook_state) -> dict[str, jax.Array]:
    return {} if self.hook is None else self.hook.loss_scales(hook_state)


def _micro_loss(params, router_state, hook_state, batch, step, rng, *,
                model, settings: StepSettings):
  logits, auxes = scoring.apply_model(model, params, router_state,
                                      batch['inputs'], train=True, step=step,
                                      rng=rng, **scoring.model_inputs(batch))
  ce, accuracy = scoring.token_cross_entropy(logits, batch['targets'],
                                             batch.get(scoring.LOSS_MASK))
  layer_losses = stack_layers(auxes, 'losses')
  aux = weighted_aux_loss(layer_losses, settings.coefficients,
                          settings.layer_reduction,
                          settings.loss_scales(hook_state),
                          settings.aux_groups)
  stats = {'ce': ce, 'accuracy': accuracy, 'aux_total': aux,
           'losses': layer_losses, 'layers': stack_layers(auxes, 'metrics')}
  return ce + aux, stats


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model,
               optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, settings: StepSettings
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a global batch {'inputs', 'targets'} [G, S] (and
  the optional fields of scoring.batch_fields: loss_mask, images, ...)."""
  accum = settings.grad_accum
  step_key = jax.random.fold_in(jax.random.key(settings.seed), state.step)
  grad_fn = jax.value_and_grad(
      functools.partial(_micro_loss, model=model, settings=settings),
      has_aux=True)

  # Micro-batch i takes rows i, i + A, ...: every data shard keeps its rows.
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
      .swapaxes(0, 1), batch)                                   # [A, B, S]

  def one(grads, inputs):
    index, mb = inputs
    (loss, stats), g = grad_fn(state.params, state.router_state,
                               state.router_hook, mb, state.step,
                               jax.random.fold_in(step_key, index))
    grads = jax.tree.map(lambda a, b: a + b / accum, grads, g)
    return grads, (loss, stats)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, (losses, stats) = jax.lax.scan(
      one, zeros, (jnp.arange(accum), micro))
  # Mean over micro-batches, except expert counts, which add up; the load
  # statistics are those of the step's summed counts, so they do not change
  # with train.grad_accum.
  layers = stats.pop('layers')
  stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), stats)
  counts = layers.pop('expert_counts', None)                   # [A, L, E']
  layers = jax.tree.map(lambda x: jnp.mean(x, axis=0), layers)
  if counts is not None:
    counts = jnp.sum(counts, axis=0)                             # [L, E']
    layers.update(metrics_lib.load_stats(counts))

  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  router_state = state.router_state
  spec = router_lib.ROUTERS.get(settings.router) if settings.router else None
  if spec is not None and spec.post_update is not None:
    params, router_state = router_post_update(
        params, router_state, counts, spec=spec,
        router_config=settings.router_config,
        router_paths=settings.router_paths)
  router_hook = state.router_hook
  if settings.hook is not None:
    router_hook = settings.hook.update(router_hook, layers,
                                       settings.router_config,
                                       settings.hook_options)

  metrics = {
      'loss': jnp.mean(losses), 'ce': stats['ce'],
      'accuracy': stats['accuracy'], 'aux_total': stats['aux_total'],
      'grad_norm': grad_norm, 'learning_rate': schedule(state.step),
      # Norm of the updated parameters: a finite loss with an overflowing
      # update must not be checkpointed as good.
      'param_norm': optax.global_norm(params),
  }
  for name, per_layer in stats['losses'].items():
    metrics[f'aux/{name}'] = reduce_layers(
        per_layer, settings.layer_reduction, settings.aux_groups)
  for name in ('max_mean_load', 'load_cv'):
    if name in layers:
      metrics[name] = layers[name]                               # [L]
  for name, per_layer in layers.items():
    if name not in ('max_mean_load', 'load_cv', 'expert_load'):
      metrics[name] = jnp.mean(per_layer)
  if settings.hook is not None:
    # The value this step's loss used (before the update).
    metrics.update(settings.hook.metrics(state.router_hook))
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state, router_state=router_state,
                            router_hook=router_hook)
  return new_state, metrics


def _first_non_finite(pending: list[tuple[int, dict]]):
  """(index, message) of the first record with a NaN / inf, or None."""
  for i, (step, metrics) in enumerate(pending):
    for name in ('loss', 'grad_norm', 'param_norm'):
      value = float(metrics[name])
      if not math.isfinite(value):
        return i, f'{name} is {value} at step {step}'
  return None


def _divergence_message(what: str, step: int, checkpoints) -> str:
  last = checkpoints.latest_step()
  where = (f'The last good checkpoint is step {last} in '
           f'{checkpoints.directory} (nothing after step {step - 1} was '
           'saved); restarting resumes from it.' if last is not None else
           f'No checkpoint had been saved yet ({checkpoints.directory} is '
           'empty), so a restart begins from scratch.')
  return (f'{what}: training stopped. {where} Lower train.learning_rate or '
          "train.grad_clip, or use train.dtype='float32'.")


def _host(metrics: dict) -> dict:
  return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def _training_tracer(config: ConfigDict, model, pipeline):
  """routing_fn for train.trace_every, or None when tracing is off."""
  if not config.train.trace_every:
    return None
  if pipeline.valid is None:
    raise ValueError('train.trace_every: traces cover the validation set, '
                     'and this data config has none (data.eval_path / '
                     'data.tfds_eval_split)')
  if jax.process_count() > 1:
    raise ValueError(
        f'train.trace_every: tracing during training is single-process; '
        f'this run has {jax.process_count()} processes. Set it to 0 and '
        'trace checkpoints afterwards with --mode=trace')
  return tracing.routing_fn(model, with_probs=config.train.trace_probs)


def _zero_shot_evaluator(config: ConfigDict, model, workdir: str):
  """state -> {task: score, 'average'} for train.eval_tasks_every, or None.

  The task list and its data folders are checked here, at the start, so a
  typo fails before any step is trained. The scorer is built once and
  given each evaluation's variables, so it compiles once.
  """
  train_cfg = config.train
  if not train_cfg.eval_tasks_every:
    return None
  names = tasks_lib.parse_task_list(train_cfg.eval_tasks)
  zero_shot.check_data(names, config.eval.data_dir)
  tokenizer = from_config.load_run_tokenizer(config, workdir)
  scorer = None

  def evaluate(state: TrainState) -> dict[str, float]:
    nonlocal scorer
    if scorer is None:
      scorer = text_scorer_lib.TextScorer(
          loglikelihood.Scorer(model, state.params, state.router_state,
                               step=state.step, max_len=train_cfg.seq_len,
                               batch_size=config.eval.batch_size,
                               progress=False),
          tokenizer, text_scorer_lib.run_prefix(config, tokenizer))
    scorer.scorer.set_variables(state.params, state.router_state, state.step)
    results = zero_shot.evaluate_tasks(
        scorer, names, config.eval.data_dir,
        max_examples=train_cfg.eval_tasks_max_examples)
    scores = {name: entry['score'] for name, entry in results.items()}
    return dict(scores, average=zero_shot.average(results))

  return evaluate


def _restore(checkpoints, abstract_state: TrainState, config: ConfigDict,
             workdir: str):
  """restore_latest, reading pre-hook checkpoints and naming mismatches.

  A checkpoint whose tree differs from this config's model stops the run
  with an error naming the changed config fields (nothing is moved aside);
  a checkpoint written before the router hook existed (`remoe_lambda`) is
  read in its own layout and converted.
  """
  try:
    return checkpoints.restore_latest(abstract_state)
  except checkpoint_lib.CheckpointMismatch as e:
    if not any(state_lib.LEGACY_FIELD in d for d in e.differences):
      raise restore.mismatch_error(config, workdir, e.step, e.differences,
                                   'resume') from None
  legacy = state_lib.legacy_abstract(abstract_state, config.model.num_layers)
  try:
    restored = checkpoints.restore_latest(legacy)
  except checkpoint_lib.CheckpointMismatch as e:
    raise restore.mismatch_error(config, workdir, e.step, e.differences,
                                 'resume') from None
  if restored is None:
    return None
  step, old, data_state = restored
  logging.info('checkpoint %d predates the router step hook; converted its '
               '%s', step, state_lib.LEGACY_FIELD)
  return step, state_lib.from_legacy(old, abstract_state.router_hook), \
      data_state


def _is_vlm(config: ConfigDict) -> bool:
  return config.model_name == 'llava'


def _resolve_start(config: ConfigDict, workdir: str) -> None:
  """Fills the config's model from where the run starts (HF directories,
  the previous VLM stage), before anything else reads it."""
  if _is_vlm(config):
    init_vlm.resolve(config, workdir)
  elif config.init.hf_path:
    # The HF directory's config.json defines the model (and its tokenizer).
    init_from_hf.resolve(config)


def _start_from_pretrained(config: ConfigDict, model, state: TrainState,
                           shardings: TrainState) -> TrainState:
  """The fresh state with the imported (and upcycled) variables: an HF
  model (config.init.hf_path) or a VLM stage's start (convert/init_vlm)."""
  start = time.perf_counter()
  if _is_vlm(config):
    params, router_state = init_vlm.initial_variables(config, model)
    where = init_vlm.describe(config)
  else:
    params, router_state = init_from_hf.initial_variables(config)
    where = config.init.hf_path + (
        f', upcycled to {config.init.upcycle.num_experts} '
        f'{config.init.upcycle.router} experts'
        if config.init.upcycle.router else '')
  state = state.replace(
      params=jax.device_put(params, shardings.params),
      router_state=jax.device_put(router_state, shardings.router_state)
      if router_state else state.router_state)
  logging.info('starting from %s in %.1f s', where,
               time.perf_counter() - start)
  return state


class _MetricsWriter:
  """Step records in metrics.jsonl and the periodic progress line.

  Records wait on the host until the next log line or checkpoint: every step
  a checkpoint covers has its record on disk before the checkpoint is saved
  (a resumed run never re-runs those steps), and a NaN stop writes the
  records of the good steps before it.

  Throughput (tokens_per_s, samples_per_s, mfu, and the ETA) is measured
  per interval between flushes, over training steps only: the first step
  (compilation) is left out, and so is the time spent inside `paused()`
  (validation, zero-shot evaluation, traces, checkpoint saves).
  """

  def __init__(self, log: run_log_lib.RunLog, checkpoints, *,
               tokens_per_step: int, samples_per_step: int,
               flops_per_token: float | None, peak: float | None, stop: int):
    self.log, self.checkpoints = log, checkpoints
    self.tokens_per_step, self.stop = tokens_per_step, stop
    self.samples_per_step = samples_per_step
    self.flops_per_token, self.peak = flops_per_token, peak
    self.pending: list[tuple[int, dict]] = []
    self.first_loss = self.last_loss = None
    # The current interval: its start, its timed steps and the seconds
    # inside paused() since its start.
    self.timer_start, self.timer_steps, self.paused_seconds = None, 0, 0.0

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))
    if self.timer_start is None:
      # Compilation happens in the first step: time from its end.
      jax.block_until_ready(metrics['loss'])
      self.timer_start, self.timer_steps = time.perf_counter(), 0
      self.paused_seconds = 0.0
    else:
      self.timer_steps += 1

  def _wait_for_steps(self) -> None:
    """Blocks until the pending steps have run (dispatch is asynchronous)."""
    if self.pending:
      jax.block_until_ready(self.pending[-1][1]['loss'])

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Time spent in the block is not training time (validation, ...)."""
    if self.timer_start is None:
      yield
      return
    # The steps dispatched before the block are training time.
    self._wait_for_steps()
    start = time.perf_counter()
    try:
      yield
    finally:
      self.paused_seconds += time.perf_counter() - start

  def flush(self, *, progress: bool) -> None:
    """Writes the pending records (raises TrainingDiverged on a NaN)."""
    if not self.pending:
      return
    self._wait_for_steps()
    now = time.perf_counter()
    seconds = now - self.timer_start - self.paused_seconds
    steps = self.timer_steps
    # The next interval starts here.
    self.timer_start, self.timer_steps, self.paused_seconds = now, 0, 0.0
    bad = _first_non_finite(self.pending)
    good = self.pending if bad is None else self.pending[:bad[0]]
    step = self.pending[-1][0]
    rate = (steps * self.tokens_per_step / seconds
            if steps and seconds > 0 else 0.0)
    for s, m in good:
      record = _host(m)
      if s == step:
        # Throughput only on the interval's last record.
        record['tokens_per_s'] = rate
        # Sequences per second (VLM: images per second, one per sample).
        record['samples_per_s'] = (rate * self.samples_per_step /
                                   self.tokens_per_step)
        if self.peak and rate and self.flops_per_token:
          record['mfu'] = self.flops_per_token * rate / (
              self.peak * jax.device_count())
      self.log.write('train', s, record)
      if self.first_loss is None:
        self.first_loss = float(record['loss'])
      self.last_loss = float(record['loss'])
    self.pending = []
    if bad is not None:
      raise TrainingDiverged(_divergence_message(
          bad[1], good[-1][0] + 1 if good else step, self.checkpoints))
    if progress:
      eta = ((self.stop - step) * seconds / steps if steps and seconds > 0
             else None)
      self.log.progress(step, record, rate, eta)


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns:
    {'step', 'first_loss', 'last_loss', 'valid': last validation metrics,
    'best_step'} of this process's run ('first_loss' / 'last_loss' None
    when this start trained no step).

  Raises:
    TrainingDiverged: a NaN / inf loss or gradient norm; the last good
      checkpoint stays on disk.
    ValueError: the config does not match the workdir's checkpoints.
  """
  _resolve_start(config, workdir)
  # moe.backend='auto' -> the backend this machine runs (a start-up probe on
  # a GPU), before it is validated and written to config.json.
  backend_probe.resolve_config(config)
  attention_probe.resolve_config(config)
  config_lib.validate(config, num_devices=jax.device_count())
  train_cfg = config.train
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0

  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.logical_rules(config.mesh)
  logging.info('mesh: %s over %d %s devices', dict(mesh.shape),
               jax.device_count(), jax.devices()[0].platform)

  model = models.build(config)
  optimizer, schedule = state_lib.make_optimizer(train_cfg)
  settings = StepSettings.from_config(config, model)
  init_fn = functools.partial(state_lib.init_state, model=model,
                              optimizer=optimizer, config=config)
  key = jax.random.key(train_cfg.seed)
  boxed = jax.eval_shape(init_fn, key)
  state_shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(boxed), state_shardings)
  num_params = sum(math.prod(p.shape) for p in
                   jax.tree.leaves(nn.unbox(boxed).params))
  logging.info('model: %s parameters', f'{num_params:,}')

  checkpoints = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=train_cfg.keep)
  try:
    # Before anything is written: a config that does not match the saved
    # checkpoints stops here, leaving config.json and the run untouched.
    restored = _restore(checkpoints, abstract_state, config, workdir)
  except BaseException:
    checkpoints.close()
    raise
  if primary:
    run_log_lib.write_resolved_config(config, workdir)
  stop = train_cfg.halt_at_step or train_cfg.steps
  if restored is not None and restored[0] >= stop:
    checkpoints.close()
    logging.info('nothing to train: %s already holds step %d (train.steps='
                 '%d%s). Raise --config.train.steps to train further.',
                 workdir, restored[0], train_cfg.steps,
                 f', halt_at_step={stop}' if train_cfg.halt_at_step else '')
    return {'step': restored[0], 'first_loss': None, 'last_loss': None,
            'valid': None, 'best_step': checkpoints.best_step()}
  try:
    pipeline = from_config.build_data(config, workdir)
  except BaseException:
    checkpoints.close()
    raise
  logging.info('data: %s', pipeline.summary())

  if restored is None:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = jax.jit(lambda k: nn.unbox(init_fn(k)),
                      out_shardings=state_shardings)(key)
    data_state = None
    if _is_vlm(config) or config.init.hf_path:
      state = _start_from_pretrained(config, model, state, state_shardings)
    else:
      logging.info('starting from scratch in %s', workdir)
  else:
    start, state, data_state = restored
    logging.info('resumed from checkpoint %d in %s', start,
                 checkpoints.directory)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, optimizer=optimizer,
                        schedule=schedule, settings=settings),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(scoring.eval_step, model=model),
                    in_shardings=(state_shardings.params,
                                  state_shardings.router_state,
                                  state_shardings.step, batch_sharding),
                    out_shardings=sharding_lib.replicated(mesh))
  route_fn = _training_tracer(config, model, pipeline)
  zero_shot_fn = _zero_shot_evaluator(config, model, workdir)

  step = int(state.step)
  log = run_log_lib.RunLog(workdir,
                           attempt=run_log_lib.next_attempt(workdir),
                           total_steps=train_cfg.steps, is_primary=primary)
  writer = _MetricsWriter(
      log, checkpoints,
      tokens_per_step=train_cfg.global_batch * train_cfg.seq_len,
      samples_per_step=train_cfg.global_batch,
      # The LM's FLOP count; a VLM's tower has none yet (no MFU logged).
      flops_per_token=(None if _is_vlm(config) else
                       flops_lib.train_flops_per_token(config)),
      peak=flops_lib.peak_flops(jax.devices()[0].device_kind), stop=stop)
  train_iter = pipeline.train_iterator(data_state)
  summary = {'step': step, 'valid': None}

  def validate_now():
    batches = (sharding_lib.global_batch(scoring.batch_fields(local),
                                         batch_sharding)
               for local in pipeline.valid_iterator())
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return scoring.evaluate(
          lambda b: eval_fn(state.params, state.router_state, state.step, b),
          batches)

  try:
    while step < stop:
      local = next(train_iter)
      batch = sharding_lib.global_batch(scoring.batch_fields(local),
                                        batch_sharding)
      if writer.timer_start is None:
        logging.info('compiling the train step (the first step includes '
                     'it)...')
        compile_start = time.perf_counter()
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, metrics = step_fn(state, batch)
      step += 1
      first = writer.timer_start is None
      writer.add(step, metrics)
      if first:
        logging.info('first step (compilation included) took %.1f s',
                     time.perf_counter() - compile_start)
      last = step == stop
      if step % train_cfg.log_every == 0 or last:
        writer.flush(progress=True)
      valid_loss = None
      if pipeline.valid is not None and (
          step % train_cfg.eval_every == 0 or step == train_cfg.steps):
        with writer.paused():
          valid = validate_now()
        valid_loss = valid['loss']
        summary['valid'] = valid
        log.write('valid', step, valid)
        logging.info('step %d validation: loss %.4f | ppl %.2f | accuracy '
                     '%.4f', step, valid['loss'], valid['ppl'],
                     valid['accuracy'])
      if zero_shot_fn is not None and (
          step % train_cfg.eval_tasks_every == 0 or step == train_cfg.steps):
        with writer.paused():
          scores = zero_shot_fn(state)
        log.write(zero_shot.SPLIT, step, scores)
        logging.info('step %d zero-shot (at most %d items per group): %s',
                     step, train_cfg.eval_tasks_max_examples,
                     ' | '.join(f'{k} {100 * v:.2f}' for k, v in
                                scores.items()))
      if route_fn is not None and (step % train_cfg.trace_every == 0 or
                                   step == train_cfg.steps):
        with writer.paused(), jax.set_mesh(mesh), nn.logical_axis_rules(
            rules):
          traced = tracing.trace_state(
              route_fn, state.params, state.router_state, pipeline,
              os.path.join(workdir, 'traces'), step)
        logging.info('step %d: traced %d token-layer rows to %s', step,
                     traced['rows'], traced['path'])
      if step % train_cfg.checkpoint_every == 0 or last:
        # The records of every step this checkpoint covers go first.
        writer.flush(progress=False)
        with writer.paused():
          save_start = time.perf_counter()
          checkpoints.save(step, state, train_iter.get_state(), valid_loss)
        logging.info('checkpoint %d: save started in %.2f s (written in the '
                     'background)', step, time.perf_counter() - save_start)
    summary['step'] = step
  finally:
    try:
      checkpoints.close()
    finally:
      log.close()
  summary['first_loss'], summary['last_loss'] = (writer.first_loss,
                                                 writer.last_loss)
  summary['best_step'] = checkpoints.best_step()
  best = summary['best_step']
  logging.info('done at step %d: loss %.4f at the first step of this start, '
               '%.4f at the last; best checkpoint by validation loss: %s',
               step, writer.first_loss, writer.last_loss,
               best if best is not None else 'none (no validation yet)')
  return summary
