"""Pretraining: `train_and_evaluate(config, workdir)` and its jitted steps.

One optimiser step (`make_train_step`):
  1. split the global batch into `train.grad_accum` micro-batches; for each,
     loss = CE + Σ_name coef_name · reduce_layers(aux_name) (ReMoE's L1
     additionally times the adaptive λ), gradients by value_and_grad;
  2. AdamW (optax) on the mean gradient, after global-norm clipping;
  3. the router's post-update from the step's statistics (DeepSeek-V3 bias
     from expert counts summed over micro-batches, XMoE norm projection);
  4. ReMoE's λ from the step's sparsity (algorithms.md §3.11).
Router logits, softmax and every loss are float32 (the layer does that);
matmuls run in `train.dtype`.

The step RNG is fold_in(seed, step), so a resumed run draws the same noise.

Dimension legend: G global batch, A micro-batches, B = G / A, S sequence, V
vocabulary, L layers, E' router width.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config_lib
from moe_jax import flops as flops_lib
from moe_jax import run_log as run_log_lib
from moe_jax import sharding as sharding_lib
from moe_jax import trace as trace_lib
from moe_jax.data import pipeline as pipeline_lib
from moe_jax.data import sources as sources_lib
from moe_jax.data import tokenizer as tokenizer_lib
from moe_jax.moe import layer as layer_lib
from moe_jax.moe import router as router_lib

ConfigDict = ml_collections.ConfigDict

# LibMoE LM ReMoE (parity flag remoe_libmoe, D8): per-layer λ clamped here.
REMOE_LIBMOE_CLAMP = (1e-6, 1e2)


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  step: completed optimiser steps (int32 scalar).
  params: trainable parameters.
  opt_state: optax state.
  router_state: the model's 'router_state' collection ({} if none).
  remoe_lambda: [L] float32, ReMoE's adaptive L1 weight per layer (all equal
    unless the LibMoE parity flag is set; unused for other routers).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  router_state: Any
  remoe_lambda: jax.Array


# ----------------------------------------------------------------------------
# Optimiser.

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


def make_optimizer(train: ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping, then AdamW with decay on all parameters."""
  schedule = learning_rate_schedule(train)
  tx = optax.chain(
      optax.clip_by_global_norm(train.grad_clip),
      optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps,
                  weight_decay=train.weight_decay))
  return tx, schedule


# ----------------------------------------------------------------------------
# Losses and routing statistics.

def token_cross_entropy(logits, targets):
  """logits [B, S, V] float32, targets [B, S] -> (mean CE, accuracy)."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)                       # [B, S]
  target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  correct = jnp.argmax(logits, axis=-1) == targets
  return jnp.mean(logz - target_logit), jnp.mean(correct.astype(jnp.float32))


def stack_layers(auxes: list[dict], part: str) -> dict[str, jax.Array]:
  """aux[part] of every layer, stacked: {name: [L, ...]}."""
  if not auxes or not auxes[0][part]:
    return {}
  return {name: jnp.stack([a[part][name] for a in auxes])
          for name in auxes[0][part]}


def weighted_aux_loss(layer_losses: dict[str, jax.Array],
                      coefficients: dict[str, float], reduction: str,
                      remoe_lambda: jax.Array) -> jax.Array:
  """Σ_name coef · reduce_L(loss_name [L]); ReMoE's L1 is scaled by λ [L]."""
  total = jnp.zeros((), jnp.float32)
  for name, coefficient in coefficients.items():
    per_layer = layer_losses[name]                                # [L]
    if name == 'remoe_l1':
      per_layer = per_layer * remoe_lambda
    reduced = (jnp.sum(per_layer) if reduction == 'sum'
               else jnp.mean(per_layer))
    total = total + coefficient * reduced
  return total


def update_remoe_lambda(remoe_lambda, sparsity, *, target: float,
                        alpha: float, libmoe: bool):
  """One λ update from sparsity [L] (algorithms.md §3.11).

  Paper: S = mean over layers; λ ← λ·α if S < target else λ/α, no clamp,
  one value for all layers. LibMoE parity: per layer, clamped.
  """
  if libmoe:
    up = sparsity < target                                        # [L]
    new = jnp.where(up, remoe_lambda * alpha, remoe_lambda / alpha)
    return jnp.clip(new, *REMOE_LIBMOE_CLAMP)
  up = jnp.mean(sparsity) < target
  return jnp.where(up, remoe_lambda * alpha, remoe_lambda / alpha)


def _router_path(i: int) -> tuple[str, ...]:
  return (f'layer_{i}', 'moe', 'router', 'router')


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def router_post_update(params, router_state, expert_counts, *, spec,
                       router_config, num_layers):
  """Applies the router's post_update to every layer; counts [L, E']."""
  for i in range(num_layers):
    path = _router_path(i)
    layer_state = (_get(router_state, path) if router_state else {})
    new_params, new_state = spec.post_update(
        _get(params, path), layer_state, {'expert_counts': expert_counts[i]},
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
  num_layers: int
  router: str | None
  router_config: Any
  remoe_alpha: float = 1.2
  remoe_target: float = 0.0
  remoe_libmoe: bool = False

  @classmethod
  def from_config(cls, config: ConfigDict) -> 'StepSettings':
    router, router_config = None, None
    extra = {}
    if not config.model.dense_ffn:
      block = layer_lib.MoEBlock(**config_lib.ffn_kwargs(config))
      router, router_config = config.moe.router, block.router_config()
      if router == 'remoe':
        extra = dict(
            remoe_alpha=float(config.loss.remoe.alpha),
            remoe_target=1.0 - config.moe.top_k / config.moe.num_experts,
            remoe_libmoe=router_config.flag('remoe_libmoe'))
    return cls(coefficients=dict(config.loss.coefficients),
               layer_reduction=config.loss.layer_reduction,
               grad_accum=config.train.grad_accum, seed=config.train.seed,
               num_layers=config.model.num_layers, router=router,
               router_config=router_config, **extra)


def _apply(model, params, router_state, inputs, *, train, step, rng=None):
  variables = {'params': params}
  if router_state:
    variables['router_state'] = router_state
  rngs = {'router': rng} if rng is not None else None
  return model.apply(variables, inputs, train=train, step=step, rngs=rngs)


def _micro_loss(params, router_state, remoe_lambda, batch, step, rng, *,
                model, settings: StepSettings):
  logits, auxes = _apply(model, params, router_state, batch['inputs'],
                         train=True, step=step, rng=rng)
  ce, accuracy = token_cross_entropy(logits, batch['targets'])
  layer_losses = stack_layers(auxes, 'losses')
  aux = weighted_aux_loss(layer_losses, settings.coefficients,
                          settings.layer_reduction, remoe_lambda)
  stats = {'ce': ce, 'accuracy': accuracy, 'aux_total': aux,
           'losses': layer_losses, 'layers': stack_layers(auxes, 'metrics')}
  return ce + aux, stats


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model,
               optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, settings: StepSettings
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a global batch {'inputs', 'targets'} [G, S]."""
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
                               state.remoe_lambda, mb, state.step,
                               jax.random.fold_in(step_key, index))
    grads = jax.tree.map(lambda a, b: a + b / accum, grads, g)
    return grads, (loss, stats)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, (losses, stats) = jax.lax.scan(
      one, zeros, (jnp.arange(accum), micro))
  # Mean over micro-batches, except expert counts, which add up.
  layers = stats.pop('layers')
  stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), stats)
  counts = layers.pop('expert_counts', None)
  layers = jax.tree.map(lambda x: jnp.mean(x, axis=0), layers)

  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  router_state = state.router_state
  spec = router_lib.ROUTERS.get(settings.router) if settings.router else None
  if spec is not None and spec.post_update is not None:
    params, router_state = router_post_update(
        params, router_state, jnp.sum(counts, axis=0), spec=spec,
        router_config=settings.router_config,
        num_layers=settings.num_layers)
  remoe_lambda = state.remoe_lambda
  if settings.router == 'remoe':
    remoe_lambda = update_remoe_lambda(
        remoe_lambda, layers['remoe_sparsity'], target=settings.remoe_target,
        alpha=settings.remoe_alpha, libmoe=settings.remoe_libmoe)

  metrics = {
      'loss': jnp.mean(losses), 'ce': stats['ce'],
      'accuracy': stats['accuracy'], 'aux_total': stats['aux_total'],
      'grad_norm': grad_norm, 'learning_rate': schedule(state.step),
      # Norm of the updated parameters: a finite loss with an overflowing
      # update must not be checkpointed as good.
      'param_norm': optax.global_norm(params),
  }
  reduce = jnp.sum if settings.layer_reduction == 'sum' else jnp.mean
  for name, per_layer in stats['losses'].items():
    metrics[f'aux/{name}'] = reduce(per_layer)
  for name in ('max_mean_load', 'load_cv'):
    if name in layers:
      metrics[name] = layers[name]                               # [L]
  for name, per_layer in layers.items():
    if name not in ('max_mean_load', 'load_cv', 'expert_load'):
      metrics[name] = jnp.mean(per_layer)
  if settings.router == 'remoe':
    metrics['remoe_lambda'] = jnp.mean(state.remoe_lambda)
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state, router_state=router_state,
                            remoe_lambda=remoe_lambda)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model
              ) -> dict[str, jax.Array]:
  """Mean CE and next-token accuracy of one validation batch (no noise)."""
  logits, _ = _apply(model, state.params, state.router_state, batch['inputs'],
                     train=False, step=state.step)
  ce, accuracy = token_cross_entropy(logits, batch['targets'])
  return {'ce': ce, 'accuracy': accuracy}


# ----------------------------------------------------------------------------
# State construction.

def init_state(key, *, model, optimizer, config: ConfigDict) -> TrainState:
  """A fresh TrainState; parameters keep their logical boxes (unbox later)."""
  tokens = jnp.zeros((1, config.train.seq_len), jnp.int32)
  params_key, router_key = jax.random.split(key)
  variables = model.init({'params': params_key, 'router': router_key},
                         tokens, train=False)
  params = variables['params']
  lambda0 = 1.0
  if 'remoe' in config.loss:
    lambda0 = config.loss.remoe.lambda0
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=optimizer.init(params),
      router_state=dict(variables.get('router_state', {})),
      remoe_lambda=jnp.full((config.model.num_layers,), lambda0, jnp.float32))


# ----------------------------------------------------------------------------
# Data.

def build_data(config: ConfigDict, workdir: str) -> pipeline_lib.Pipeline:
  """Source -> tokenizer (loaded or trained and cached) -> grain pipeline."""
  data = config.data
  common = dict(text_field=data.text_field, doc_mode=data.doc_mode,
                tfds_name=data.tfds_name,
                tfds_data_dir=data.tfds_data_dir or None,
                synthetic=data.synthetic.to_dict())
  source = sources_lib.make_source(
      data.source, path=data.train_path or None,
      tfds_split=data.tfds_train_split, **common)
  valid_source = None
  if data.source == 'tfds':
    valid_source = sources_lib.make_source(
        'tfds', tfds_split=data.tfds_eval_split, **common)
  elif data.source != 'synthetic' and data.eval_path:
    valid_source = sources_lib.make_source(
        data.source, path=data.eval_path, field=sources_lib.EVAL_PATH_FIELD,
        **common)
  tokenizer = tokenizer_lib.load_or_train_tokenizer(
      model_path=data.tokenizer or None, workdir=workdir, texts=source,
      vocab_size=data.vocab_size, split_digits=data.split_digits,
      separator=data.doc_separator)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ValueError(
        f'config.data.tokenizer: the tokenizer has {tokenizer.vocab_size} '
        f'pieces but config.model.vocab_size={config.model.vocab_size}; set '
        f'--config.data.vocab_size={tokenizer.vocab_size}')
  return pipeline_lib.build_pipeline(
      source, tokenizer, seq_len=data.seq_len,
      global_batch_size=config.train.global_batch, seed=data.shuffle_seed,
      valid_source=valid_source,
      valid_windows=config.train.eval_batches * config.train.global_batch,
      separator=data.doc_separator, max_tokens=data.max_tokens,
      max_valid_tokens=data.max_valid_tokens,
      cache_dir=data.cache_dir or os.path.join(workdir, 'cache'))


# ----------------------------------------------------------------------------
# The run.

def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename (all or nothing)."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
  with os.fdopen(fd, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def write_resolved_config(config: ConfigDict, workdir: str) -> None:
  """Writes config.json; on a resume, logs every field that changed."""
  path = os.path.join(workdir, 'config.json')
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      old = _flatten(json.load(f))
    new = _flatten(json.loads(text))
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        logging.warning('config.%s changed since the last start of this '
                        'workdir: %r -> %r', key, old.get(key), new.get(key))
  write_text_atomic(path, text)


def _next_attempt(workdir: str) -> int:
  path = os.path.join(workdir, run_log_lib.METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as f:
    attempts = [json.loads(line).get('attempt', 0) for line in f
                if line.strip()]
  return max(attempts, default=-1) + 1


def _check_finite(pending: list[tuple[int, dict]], checkpoints) -> None:
  for step, metrics in pending:
    for name in ('loss', 'grad_norm', 'param_norm'):
      value = float(metrics[name])
      if not math.isfinite(value):
        raise TrainingDiverged(
            f'{name} is {value} at step {step}: training stopped. The last '
            f'good checkpoint is step {checkpoints.latest_step()} in '
            f'{checkpoints.directory} (nothing after step {step - 1} was '
            'saved). Lower train.learning_rate or train.grad_clip, or use '
            "train.dtype='float32', and restart: the run resumes from it.")


def _host(metrics: dict) -> dict:
  return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}


def evaluate(state, pipeline, eval_fn, batch_sharding) -> dict[str, float]:
  """Validation loss (mean CE), perplexity and next-token accuracy."""
  totals = {'ce': 0.0, 'accuracy': 0.0}
  count = 0
  for local in pipeline.valid_iterator():
    batch = sharding_lib.global_batch(
        {k: local[k] for k in ('inputs', 'targets')}, batch_sharding)
    out = jax.device_get(eval_fn(state, batch))
    for key in totals:
      totals[key] += float(out[key])
    count += 1
  ce = totals['ce'] / count
  return {'loss': ce, 'ppl': math.exp(min(ce, 50.0)),
          'accuracy': totals['accuracy'] / count, 'batches': count}


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
  return trace_lib.routing_fn(model, with_probs=config.train.trace_probs)


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns:
    {'step', 'first_loss', 'last_loss', 'valid': last validation metrics,
    'best_step'} of this process's run.

  Raises:
    TrainingDiverged: a NaN / inf loss or gradient norm; the last good
      checkpoint stays on disk.
  """
  config_lib.validate(config, num_devices=jax.device_count())
  train_cfg = config.train
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0
  if primary:
    write_resolved_config(config, workdir)

  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.logical_rules(config.mesh)
  logging.info('mesh: %s over %d %s devices', dict(mesh.shape),
               jax.device_count(), jax.devices()[0].platform)
  pipeline = build_data(config, workdir)
  logging.info('data: %s', pipeline.summary())

  model = config_lib.build_model(config)
  optimizer, schedule = make_optimizer(train_cfg)
  settings = StepSettings.from_config(config)
  init_fn = functools.partial(init_state, model=model, optimizer=optimizer,
                              config=config)
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
  restored = checkpoints.restore_latest(abstract_state)
  if restored is None:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = jax.jit(lambda k: nn.unbox(init_fn(k)),
                      out_shardings=state_shardings)(key)
    data_state = None
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
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(state_shardings, batch_sharding),
                    out_shardings=sharding_lib.replicated(mesh))
  route_fn = _training_tracer(config, model, pipeline)

  step = int(state.step)
  stop = train_cfg.halt_at_step or train_cfg.steps
  log = run_log_lib.RunLog(workdir, attempt=_next_attempt(workdir),
                           total_steps=train_cfg.steps, is_primary=primary)
  tokens_per_step = train_cfg.global_batch * train_cfg.seq_len
  flops_per_token = flops_lib.train_flops_per_token(config)
  peak = flops_lib.peak_flops(jax.devices()[0].device_kind)
  train_iter = pipeline.train_iterator(data_state)
  summary = {'step': step, 'first_loss': None, 'last_loss': None,
             'valid': None}
  pending: list[tuple[int, dict]] = []
  timer_start, timer_steps = None, 0
  try:
    while step < stop:
      local = next(train_iter)
      batch = sharding_lib.global_batch(
          {k: local[k] for k in ('inputs', 'targets')}, batch_sharding)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, metrics = step_fn(state, batch)
      step += 1
      pending.append((step, metrics))
      if timer_start is None:
        # Compilation happens in the first step: time from its end.
        jax.block_until_ready(metrics['loss'])
        timer_start, timer_steps = time.perf_counter(), 0
      else:
        timer_steps += 1
      last = step == stop
      if step % train_cfg.log_every == 0 or last:
        _check_finite(pending, checkpoints)
        host = _host(pending[-1][1])
        seconds = time.perf_counter() - timer_start
        rate = timer_steps * tokens_per_step / seconds if timer_steps else 0.
        if peak and rate:
          host['mfu'] = flops_per_token * rate / (peak * jax.device_count())
        host['tokens_per_s'] = rate
        if summary['first_loss'] is None:
          summary['first_loss'] = float(_host(pending[0][1])['loss'])
        summary['last_loss'] = float(host['loss'])
        for s, m in pending:
          # Every step's own values (losses are exact per step for resume
          # checks); throughput only on the interval's last record.
          record = _host(m) if s != step else host
          log.write('train', s, record)
        eta = (stop - step) * seconds / timer_steps if timer_steps else None
        log.progress(step, host, rate, eta)
        pending = []
      valid_loss = None
      if pipeline.valid is not None and (
          step % train_cfg.eval_every == 0 or step == train_cfg.steps):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
          valid = evaluate(state, pipeline, eval_fn, batch_sharding)
        valid_loss = valid['loss']
        summary['valid'] = valid
        log.write('valid', step, valid)
        logging.info('step %d validation: loss %.4f | ppl %.2f | accuracy '
                     '%.4f', step, valid['loss'], valid['ppl'],
                     valid['accuracy'])
      if route_fn is not None and (step % train_cfg.trace_every == 0 or
                                   step == train_cfg.steps):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
          traced = trace_lib.trace_state(
              route_fn, state.params, state.router_state, pipeline,
              os.path.join(workdir, 'traces'), step)
        logging.info('step %d: traced %d token-layer rows to %s', step,
                     traced['rows'], traced['path'])
      if step % train_cfg.checkpoint_every == 0 or last:
        _check_finite(pending, checkpoints)
        checkpoints.save(step, state, train_iter.get_state(), valid_loss)
    summary['step'] = step
  finally:
    checkpoints.close()
    log.close()
  summary['best_step'] = checkpoints.best_step()
  logging.info('done at step %d; first loss %s, last loss %s; best '
               'checkpoint %s', step, summary['first_loss'],
               summary['last_loss'], summary['best_step'])
  return summary
