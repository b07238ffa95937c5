r"""Train-step memory per remat policy: XLA's compiled analysis and an estimate.

  python -m moe_jax.bench.memory --config=configs/smoe_154m.py \
      [--remat=none,full,save_dots | all] [--batch=B] [--seq=S] \
      [--grad_accum=A] [--devices=N] [--backend=NAME] [--attention=xla]
      [--hbm_gb=80] [--layer_loop=unrolled|scan] [--no_compile]

For each policy of decoder.REMAT_POLICIES named in --remat, the real
`train.train_step` (grad accumulation scan, AdamW, router updates; state
donated as in training) is lowered with abstract inputs (jax.eval_shape:
nothing is allocated) at the per-device micro-batch B = global_batch /
grad_accum / devices, compiled for the first local device (never executed),
and XLA's `compiled.memory_analysis()` is printed beside the estimate below.
The last lines give, per policy, the fewest micro-batches of the config's
global batch with which the estimate fits in --hbm_gb. moe.backend 'auto'
resolves as in training (blocked on a CPU); 'pallas' becomes 'blocked' off
a GPU, where the kernel cannot compile.

XLA's figure is the platform's at hand. On a CPU the step is compiled with
the `cse_barrier_expander` pass off: XLA:CPU otherwise drops remat's
optimization barriers and CSE merges the recomputation back into the
forward pass, so every policy would report the same memory. The CPU figure
is above the estimate (at 64 x 1024 and 660M: 65 GB for 'full', estimate
32 GB): its schedule keeps more buffers alive at once (for instance the
blocked expert loop's [R, D] output rows of every layer) and several
float32 [B S, V] logits buffers.

Analytic estimate (bytes; P parameters, B S tokens per micro-batch):
  parameters       4 P (float32)
  optimizer state  8 P (AdamW first and second moments, float32)
  gradients        8 P (the accumulator the micro-batch scan carries, plus
                   one micro-batch's gradient)
  activations      L A_kept + A_layer [remat only] + B S (16 D + 12 V)
                   + c P_w [no remat]

with c the compute-dtype bytes (train.dtype), L layers, V vocabulary, D
model width; B S 16 D the final LayerNorm, B S 12 V the float32 logits,
the exponentials the cross-entropy keeps and the logits' gradient; c P_w
the compute-dtype copies of the layers' matmul weights (kept without
remat, when c < 4; the router and the float32 output layer are not cast,
and fused expert backends cast inside their op); A_layer what one layer
keeps without remat (under remat it is alive while that layer's backward
runs); and A_kept what each layer keeps between the forward and the
backward pass:

  none                     A_layer
  full                     B S 4 D (the layer input)
  save_dots                B S (4 D + c D + c (H + 2 Hkv) Dh + f)
                           + XLA attention: B S (4 H S + c H Dh)
  dots_with_no_batch_dims  B S (4 D + c D + c (H + 2 Hkv) Dh + f)
  save_qkv_proj            B S (4 D + c (H + 2 Hkv) Dh)
  save_attention_out       B S (4 D + c D)

with f the FFN half's dot outputs the backward needs: 4 E' (router logits)
+ c w_in for a shared MLP of width w, or c F_in for a dense FFN of width F.
The residual stream (a layer's input) is float32 whatever c from the second
layer on: the FFN block returns its output in its input's dtype, and its
input is the float32 LayerNorm output.

One decoder layer, derived from models/decoder.py, moe/layer.py and the
expert backends (H / Hkv query / key-value heads, Dh head width, S
sequence, E experts, E' router width, k top-k, m expert width, m_in = 2 m
for SwiGLU else m, R dispatched rows):

  A_layer = B S a_attn + B S a_router + A_experts
  a_attn   = 12 D           LayerNorm 1: x^2, x - mean, x_hat * scale
                            (float32; RMSNorm: 8 D)
           + c D            its output in the compute dtype (q/k/v input)
           + c (H + 2 Hkv) Dh  q, k (after RoPE), v
           + c H Dh         attention context (output-projection input)
           + (9 + c) H S    XLA attention: causal mask (bool), masked
                            logits and their exponentials (float32), the
                            probabilities (compute dtype)
             or 4 H         fused (cuDNN) attention: softmax statistics
  a_router = 12 D + 4 D     LayerNorm 2, router input (float32)
           + c D            expert input (the dispatch gathers from it)
           + 4 E' + 12 k    router probabilities; top-k indices, weights
                            and their normaliser
           + 4 k + 8 R/(B S)  dispatch indices (int32: row of each slot;
                            token and slot of each row)
  A_experts = R 4 m_in      fused gather + FFN + combine backends
                            (blocked): the float32 pre-activation only
            or R c (2 D + m_in + m)  the others: dispatched rows, hidden
                            before and after the activation, output rows
  shared experts of total width w: + B S c (D + w_in + w); a dense FFN
  layer of width F instead of the MoE: a_router = 12 D + c D and
  A_experts = B S c (F_in + F).

R = B S k plus the backend's padding (dispatch.num_rows: each expert's rows
rounded up to the backend's block). Assumptions: dropless routing; E' = E
(MoE++ / TC-MoE special slots add a few router columns); RoPE's sin / cos
tables, residual adds and casts keep nothing a matmul does not (RoPE's
tables add 16 (rotated dims / 2) bytes per token, left out); XLA frees a
layer's residuals as soon as its backward is done and reuses buffers
perfectly; the optimizer's update temporaries and XLA's fusion scratch are
not counted. Grouped expert matmuls are not dot_generals, so 'save_dots'
recomputes them. In JAX 0.10 jax.nn.dot_product_attention without an
`implementation` takes the XLA path on every platform, so the estimate's
default is 'xla'; --attention=fused shows a cuDNN-attention model.

'residuals (estimate)' is the part of the activations autodiff keeps from
the forward pass for the backward pass: L A_kept + B S (16 D + 4 V)
(+ c P_w without remat). 'residuals (traced)' measures it: the
saved_residuals of one micro-batch's loss (traced, not compiled), without
the parameters; the two agree within a few percent on the LM configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from typing import Any

import flax.linen as nn
import jax
# saved_residuals (behind the public print_saved_residuals) returns the
# residuals with their sources; setup.cfg pins JAX.
from jax._src import ad_checkpoint as ad_checkpoint_internal
import jax.numpy as jnp

from moe_jax import config_lib
from moe_jax import models
from moe_jax import state as state_lib
from moe_jax import train as train_lib
from moe_jax.models import decoder
from moe_jax.moe import backends as backends_lib
from moe_jax.moe import dispatch as dispatch_lib

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What the estimate needs from a config (plain numbers)."""

  params: int               # P, all parameters
  matmul_params: int        # P_w, weights the layers cast to compute dtype
  batch: int                # B, per-device micro-batch
  seq: int                  # S
  layers: int               # L
  vocab: int                # V
  d_model: int              # D
  heads: int                # H
  kv_heads: int             # Hkv
  head_dim: int             # Dh
  compute_bytes: int        # c
  rmsnorm: bool
  dense_ffn: bool
  experts: int = 0          # E
  top_k: int = 0            # k
  expert_width: int = 0     # m (dense FFN: its width F)
  swiglu: bool = False
  shared_width: int = 0     # total width of the shared MLP (0: none)
  backend: str = ''         # moe.backend, resolved

  @property
  def tokens(self) -> int:
    return self.batch * self.seq


def _width_in(width: int, swiglu: bool) -> int:
  return 2 * width if swiglu else width


def dispatch_rows(s: Shapes) -> tuple[int, bool]:
  """(R, fused): dispatched rows of a micro-batch and whether the backend
  gathers, runs the FFN and combines in one op."""
  backend = backends_lib.get_backend(s.backend)
  slots = s.tokens * s.top_k
  # Backends with a shape rule pick their blocks from the dispatch size.
  resize = getattr(backend, 'for_dispatch', None)
  if resize is not None:
    backend = resize(slots, s.experts)
  rows = dispatch_lib.num_rows(slots, s.experts, backend.row_alignment,
                               backend.row_multiple)
  return rows, backend.moe_ffn is not None


def layer_bytes(s: Shapes, fused_attention: bool) -> dict[str, int]:
  """A_layer of the docstring by part: what one layer keeps without remat."""
  c, d, t = s.compute_bytes, s.d_model, s.tokens
  norm = 8 * d if s.rmsnorm else 12 * d
  qkv = c * (s.heads + 2 * s.kv_heads) * s.head_dim
  core = (4 * s.heads if fused_attention
          else (9 + c) * s.heads * s.seq)
  parts = {'attention': t * (norm + c * d + qkv + c * s.heads * s.head_dim
                             + core)}
  if s.dense_ffn:
    parts['router'] = t * (norm + c * d)
    parts['experts'] = t * c * (_width_in(s.expert_width, s.swiglu)
                                + s.expert_width)
    return parts
  k, m = s.top_k, s.expert_width
  rows, fused = dispatch_rows(s)
  parts['router'] = (t * (norm + 4 * d + c * d + 4 * s.experts + 12 * k
                          + 4 * k) + 8 * rows)
  m_in = _width_in(m, s.swiglu)
  parts['experts'] = rows * (4 * m_in if fused else c * (2 * d + m_in + m))
  if s.shared_width:
    w = s.shared_width
    parts['experts'] += t * c * (d + _width_in(w, s.swiglu) + w)
  return parts


def kept_bytes(s: Shapes, policy: str, fused_attention: bool) -> int:
  """A_kept: bytes each layer keeps for the backward pass (micro-batch)."""
  c, d, t = s.compute_bytes, s.d_model, s.tokens
  qkv = c * (s.heads + 2 * s.kv_heads) * s.head_dim
  # Dot outputs of the FFN half the backward needs: router logits, the
  # hidden of a dense FFN or shared expert (grouped expert matmuls are not
  # dot_generals; the FFN output only feeds the residual add).
  if s.dense_ffn:
    ffn_dots = c * _width_in(s.expert_width, s.swiglu)
  else:
    ffn_dots = 4 * s.experts + c * _width_in(s.shared_width, s.swiglu)
  if policy == 'none':
    return sum(layer_bytes(s, fused_attention).values())
  # The layer input: the float32 residual stream (module docstring).
  x = 4 * d
  if policy == 'full':
    return t * x
  if policy == 'save_dots':
    scores = 0 if fused_attention else (4 * s.heads * s.seq
                                        + c * s.heads * s.head_dim)
    return t * (x + c * d + qkv + ffn_dots + scores)
  if policy == 'dots_with_no_batch_dims':
    return t * (x + c * d + qkv + ffn_dots)
  if policy == 'save_qkv_proj':
    return t * (x + qkv)
  if policy == 'save_attention_out':
    return t * (x + c * d)
  raise ValueError(f'remat: expected one of {tuple(decoder.REMAT_POLICIES)}, '
                   f'got {policy!r}')


def residual_bytes(s: Shapes, policy: str, fused_attention: bool) -> int:
  """What autodiff keeps from the forward pass for the backward pass:
  L A_kept + B S (16 D + 4 V) [+ c P_w without remat] (the '(traced
  residuals)' line measures the same)."""
  kept = (s.layers * kept_bytes(s, policy, fused_attention)
          + s.tokens * (16 * s.d_model + 4 * s.vocab))
  if policy == 'none' and s.compute_bytes < 4:
    kept += s.compute_bytes * s.matmul_params
  return kept


def analytic_memory(s: Shapes, policy: str,
                    fused_attention: bool) -> dict[str, float]:
  """The estimate of the module docstring, in bytes, by part and total."""
  # The residuals, the logits and their gradient (float32), and under remat
  # the one layer whose residuals are recomputed for its backward.
  activations = (residual_bytes(s, policy, fused_attention)
                 + s.tokens * 8 * s.vocab)
  if policy != 'none':
    activations += sum(layer_bytes(s, fused_attention).values())
  parts = {
      'parameters': 4 * s.params,
      'optimizer state (AdamW)': 8 * s.params,
      'gradients': 8 * s.params,
      'activations': activations,
  }
  parts['total'] = sum(parts.values())
  return parts


# ----------------------------------------------------------------------------
# The real train step, abstractly.

@dataclasses.dataclass
class Step:
  """The train step of a config, ready to lower (nothing allocated)."""

  model: Any
  fn: Any                   # jitted train_step (state donated)
  state: Any                # abstract TrainState
  batch: dict               # abstract {'inputs', 'targets'} [A B, S]
  settings: train_lib.StepSettings


def build_step(config, policy: str) -> Step:
  """train_step of `config` with train.remat = policy, abstract inputs."""
  with config.unlocked():
    config.train.remat = policy
  model = models.build(config)
  optimizer, schedule = state_lib.make_optimizer(config.train)
  settings = train_lib.StepSettings.from_config(config, model)
  init = functools.partial(state_lib.init_state, model=model,
                           optimizer=optimizer, config=config)
  state = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
  rows = config.train.global_batch
  batch = {name: jax.ShapeDtypeStruct((rows, config.train.seq_len),
                                      jnp.int32)
           for name in ('inputs', 'targets')}
  fn = jax.jit(functools.partial(train_lib.train_step, model=model,
                                 optimizer=optimizer, schedule=schedule,
                                 settings=settings), donate_argnums=0)
  return Step(model, fn, state, batch, settings)


# XLA:CPU expands jax.checkpoint's optimization barriers before CSE, which
# then merges the recomputation back into the forward pass: a CPU compile
# would report the same memory for every policy. Keeping the barriers makes
# the CPU numbers follow the policy; the step is only compiled, never run.
CPU_COMPILER_OPTIONS = {'xla_disable_hlo_passes': 'cse_barrier_expander'}


def compiled_memory(step: Step) -> dict[str, float]:
  """XLA's memory analysis of the compiled step (bytes) and compile seconds."""
  start = time.perf_counter()
  lowered = step.fn.lower(step.state, step.batch)
  compiled = lowered.compile(
      CPU_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None)
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  out = {
      'arguments': m.argument_size_in_bytes,
      'outputs': m.output_size_in_bytes,
      'aliased': -m.alias_size_in_bytes,
      'temp': m.temp_size_in_bytes,
      'generated code': m.generated_code_size_in_bytes,
  }
  out['total'] = sum(out.values())
  out['compile_s'] = seconds
  return out


def traced_residuals(step: Step) -> int:
  """Bytes autodiff keeps from one micro-batch's forward for its backward.

  jax.ad_checkpoint.saved_residuals of the micro-batch loss (traced, not
  compiled), parameters and other arguments excluded: the 'activations'
  the policy keeps before XLA fuses or frees anything, without the one
  layer recomputed at a time under remat.
  """
  state, s = step.state, step.settings
  micro = {k: jax.ShapeDtypeStruct((v.shape[0] // s.grad_accum,
                                    *v.shape[1:]), v.dtype)
           for k, v in step.batch.items()}
  # The train step's own micro-batch loss.
  micro_loss = train_lib._micro_loss  # pylint: disable=protected-access
  loss = lambda params, *rest: micro_loss(params, *rest, model=step.model,
                                          settings=s)[0]
  key = jax.eval_shape(lambda: jax.random.key(0))
  residuals = ad_checkpoint_internal.saved_residuals(
      loss, state.params, state.router_state, state.router_hook, micro,
      state.step, key)
  return sum(math.prod(aval.shape) * aval.dtype.itemsize
             for aval, source in residuals
             if not source.startswith('from the argument')
             and hasattr(aval, 'shape'))


def _cast_weights(params, fused_experts: bool) -> int:
  """P_w: the layers' matrices a matmul casts to the compute dtype."""
  total = 0
  for path, p in jax.tree_util.tree_leaves_with_path(params):
    names = state_lib.param_path(path).split('/')
    # layer_{i} (unrolled) or layers (train.layer_loop='scan').
    if (p.ndim < 2 or not names[0].startswith('layer') or 'router' in names
        or (fused_experts and 'experts' in names)):
      continue
    total += math.prod(p.shape)
  return total


def shapes_of(config, step: Step) -> Shapes:
  """The estimate's numbers from the config and the abstract parameters."""
  params = step.state.params
  model = step.model
  ffn = dict(model.ffn)
  micro = config.train.global_batch // config.train.grad_accum
  common = dict(
      params=sum(math.prod(p.shape) for p in jax.tree.leaves(params)),
      matmul_params=0,
      batch=micro, seq=config.train.seq_len, layers=model.num_layers,
      vocab=model.vocab_size, d_model=model.d_model, heads=model.num_heads,
      kv_heads=model.num_kv_heads or model.num_heads,
      head_dim=model.head_dim,
      compute_bytes=jnp.dtype(config.train.dtype).itemsize,
      rmsnorm=model.norm == 'rmsnorm', dense_ffn=model.dense_ffn,
      swiglu=ffn.get('activation') == 'swiglu')
  if model.dense_ffn:
    shapes = Shapes(**common, expert_width=ffn['width'])
    return dataclasses.replace(shapes,
                               matmul_params=_cast_weights(params, False))
  shared = ffn.get('shared_experts', 0) * (ffn.get('shared_width')
                                           or ffn['expert_width'])
  shapes = Shapes(**common, experts=ffn['num_experts'], top_k=ffn['top_k'],
                  expert_width=ffn['expert_width'], shared_width=shared,
                  backend=ffn['backend'])
  return dataclasses.replace(
      shapes, matmul_params=_cast_weights(params, dispatch_rows(shapes)[1]))


def fewest_micro_batches(s: Shapes, policy: str, fused_attention: bool,
                         per_device_rows: int, hbm: float) -> int | None:
  """Smallest A dividing the per-device rows whose estimate fits, or None."""
  for accum in range(1, per_device_rows + 1):
    if per_device_rows % accum:
      continue
    trial = dataclasses.replace(s, batch=per_device_rows // accum)
    if analytic_memory(trial, policy, fused_attention)['total'] <= hbm:
      return accum
  return None


# ----------------------------------------------------------------------------
# Command line.

def _configure(args) -> tuple[Any, str]:
  """The config at the per-device batch; returns it and a description."""
  config = config_lib.load_config(args.config)
  train = config.train
  devices = args.devices or jax.device_count()
  if args.grad_accum:
    train.grad_accum = args.grad_accum
  if args.seq:
    train.seq_len = args.seq
  if args.batch:
    micro = args.batch
  else:
    rows = train.global_batch // devices
    if rows * devices != train.global_batch or rows % train.grad_accum:
      raise ValueError(
          f'train.global_batch={train.global_batch} does not split into '
          f'{devices} devices x train.grad_accum={train.grad_accum}')
    micro = rows // train.grad_accum
  train.layer_loop = args.layer_loop
  text = (f'per-device micro-batch {micro} x {train.seq_len} (config: '
          f'global {train.global_batch}, grad_accum {train.grad_accum}, '
          f'{devices} device(s)' + (', --batch' if args.batch else '') + ')')
  # One device's share: grad_accum micro-batches of `micro` rows.
  train.global_batch = micro * train.grad_accum
  if not config.model.dense_ffn:
    if args.backend:
      config.moe.backend = args.backend
    elif config.moe.backend == 'pallas' and jax.default_backend() != 'gpu':
      config.moe.backend = 'blocked'
  return config, text


def _unit(total: float) -> tuple[str, float]:
  return ('GB', 1e9) if total >= 1e9 else ('MB', 1e6)


def _print_policy(policy, estimate, residuals, xla, unit, hbm_gb) -> None:
  name, scale = unit
  left = list(estimate.items()) + [
      ('residuals (estimate)', residuals[0]),
      ('residuals (traced)', residuals[1])]
  right = [(k, v) for k, v in xla.items() if k != 'compile_s'] if xla else []
  print(f'\nremat={policy}')
  print(f"  {'analytic':<26}{name:>10}" +
        (f"    {'XLA compiled':<16}{name:>10}" if xla else ''))
  for i in range(max(len(left), len(right))):
    line = (f'  {left[i][0]:<26}{left[i][1] / scale:10.3f}' if i < len(left)
            else ' ' * 38)
    if i < len(right):
      line += f'    {right[i][0]:<16}{right[i][1] / scale:10.3f}'
    print(line)
  fits = lambda total: 'yes' if total <= hbm_gb * GB else 'no'
  line = f'  fits in {hbm_gb:g} GB: {fits(estimate["total"])} (analytic)'
  if xla:
    line += (f', {fits(xla["total"])} (XLA, {jax.default_backend()}); '
             f'compiled in {xla["compile_s"]:.1f} s')
  print(line, flush=True)


def main(argv=None) -> dict:
  """Prints the tables; returns {policy: {'analytic': {part: bytes},
  'residuals': (estimated, traced) bytes, 'xla': {field: bytes} or None,
  'fewest_grad_accum': int or None}}."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/smoe_154m.py',
                      help='a config file[:arg]')
  parser.add_argument('--remat', default='none,full,save_dots',
                      help='comma-separated train.remat policies, or all '
                      f'({", ".join(decoder.REMAT_POLICIES)})')
  parser.add_argument('--batch', type=int, default=0,
                      help='per-device micro-batch (default: global_batch / '
                      'grad_accum / devices)')
  parser.add_argument('--seq', type=int, default=0,
                      help='sequence length (default: train.seq_len)')
  parser.add_argument('--grad_accum', type=int, default=0,
                      help='override train.grad_accum')
  parser.add_argument('--devices', type=int, default=0,
                      help='data-parallel devices the global batch is split '
                      'over (default: the devices at hand)')
  parser.add_argument('--backend', default='',
                      help='override moe.backend')
  parser.add_argument('--attention', default='xla', choices=('xla', 'fused'),
                      help="attention of the estimate: 'xla' (what "
                      'jax.nn.dot_product_attention runs by default) or '
                      "'fused' (cuDNN)")
  parser.add_argument('--hbm_gb', type=float, default=80.0,
                      help='device memory the fit lines test against (GB)')
  parser.add_argument('--layer_loop', default='unrolled',
                      choices=decoder.LAYER_LOOPS,
                      help="train.layer_loop: 'scan' compiles one layer "
                      '(compare the compile seconds)')
  parser.add_argument('--no_compile', action='store_true',
                      help='the estimate and traced residuals only')
  args = parser.parse_args(argv)
  policies = (list(decoder.REMAT_POLICIES) if args.remat == 'all'
              else args.remat.split(','))
  for policy in policies:
    decoder.remat_policy(policy, field='--remat')
  fused = args.attention == 'fused'

  config, text = _configure(args)
  results, shapes, unit = {}, None, None
  for policy in policies:
    step = build_step(config, policy)
    if shapes is None:
      shapes = shapes_of(config, step)
      backend = ('' if config.model.dense_ffn
                 else f', backend {config.moe.backend}')
      print(f'{args.config}: {text}, compute {config.train.dtype}{backend}; '
            f'{shapes.params:,} parameters; on {jax.devices()[0].device_kind}'
            f' ({jax.default_backend()}); attention in the estimate: '
            f"{'fused' if fused else 'xla'}")
    estimate = analytic_memory(shapes, policy, fused)
    unit = unit or _unit(estimate['total'])
    residuals = (residual_bytes(shapes, policy, fused),
                 traced_residuals(step))
    xla = None if args.no_compile else compiled_memory(step)
    results[policy] = {'analytic': estimate, 'residuals': residuals,
                       'xla': xla}
    _print_policy(policy, estimate, residuals, xla, unit, args.hbm_gb)

  full = config_lib.load_config(args.config).train
  devices = args.devices or jax.device_count()
  rows = full.global_batch // devices
  print(f'\nfewest micro-batches for {full.global_batch} x {shapes.seq} on '
        f'{devices} device(s) of {args.hbm_gb:g} GB (analytic):')
  for policy in policies:
    accum = fewest_micro_batches(shapes, policy, fused, rows,
                                 args.hbm_gb * GB)
    results[policy]['fewest_grad_accum'] = accum
    print(f'  {policy:<26}' + (f'grad_accum={accum} (micro-batch '
                               f'{rows // accum})' if accum else 'none fits'))
  return results


if __name__ == '__main__':
  main()
