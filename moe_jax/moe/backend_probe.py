"""`moe.backend='auto'`: pick a grouped-matmul backend that works here.

The Pallas kernel is the fast GPU backend, but it is compiled by Triton for
the GPU at hand, so a new JAX, driver or GPU can break it (a lowering error,
or wrong numbers). 'auto' never trusts it blindly:

  1. Not on a GPU ('cpu', 'tpu', ...): 'blocked', the fast XLA path, with no
     probe.
  2. On a GPU ('gpu' / 'cuda' / 'rocm'): probe the candidates in
     PROBE_ORDER, fastest first. A probe compiles and runs the candidate's
     gmm forward and its gradient (dx = gmm(g, w^T), dw = tgmm(x, g) for the
     Pallas custom VJP) on a small dispatched problem with uneven groups, an
     empty group and rows past the groups, in float32 and bfloat16, and
     compares them with the loop reference at dtype-aware tolerances.
  3. The first candidate that passes wins. If the first one failed, one
     warning names every failed backend and its failure; if all fail, a
     RuntimeError lists them.

Results are cached per process. `resolve_config` writes the concrete name
into the config before the model is built, so the run's config.json names
the backend that actually ran; an explicit backend name is kept as is.

Test hook: the `_fail` argument of `resolve_backend`, or the environment
variable MOE_JAX_BACKEND_PROBE_FAIL=pallas[,blocked,...], makes the named
candidates fail inside their probe (an end-to-end run can exercise the
fallback this way).

Dimension legend: R rows (after dispatch padding), D input width, F output
width, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.moe import backends
from moe_jax.moe import dispatch

AUTO = 'auto'
# Accepted values of moe.backend (config validation).
CHOICES = (AUTO, *sorted(backends.BACKENDS))
# Fastest first: the Pallas kernel, then the XLA block loop, then XLA's
# ragged_dot (its default GPU lowering is dense, ~E x the work; performance.md
# §1). 'loop' is never picked: O(E) work, a reference only.
PROBE_ORDER = ('pallas', 'blocked', 'ragged_dot')
GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')
FAIL_ENV = 'MOE_JAX_BACKEND_PROBE_FAIL'
# Characters of an exception's first line kept in a failure (Triton / MLIR
# errors can put a whole IR op on it).
_MAX_MESSAGE = 300

# Largest error allowed, relative to max |reference|. A broken kernel (wrong
# group boundary, stale tile, garbage) is off by O(1); these leave room over
# honest rounding: float32 may run as TF32 on a GPU (10-bit mantissa; 3e-4
# simulated here, 6e-7 on CPU); bfloat16 rounds the outputs to 8 significant
# bits (up to 3.9e-3; 3.2e-3 measured on CPU).
TOLERANCES = {'float32': 5e-3, 'bfloat16': 2e-2}


@dataclasses.dataclass(frozen=True)
class ProbeShape:
  """The probe problem: `slots` dispatched slots over `experts` experts.

  Group sizes are uneven, group 1 is empty, and 1/32 of the slots go to no
  expert (null slots), so rows past sum(group_sizes) exist too. Each backend
  gets them padded as dispatch pads them (its row alignment).
  """

  slots: int = 512
  experts: int = 8
  d: int = 128
  f: int = 256
  dtypes: tuple[str, ...] = ('float32', 'bfloat16')

  def __post_init__(self):
    bad = [d for d in self.dtypes if d not in TOLERANCES]
    if bad or not self.dtypes:
      raise ValueError(f'dtypes: expected names among {sorted(TOLERANCES)}, '
                       f'got {self.dtypes!r}')
    if self.slots < 32 or self.experts < 2:
      raise ValueError(f'slots, experts: expected >= 32 and >= 2, got '
                       f'{self.slots} and {self.experts}')


@dataclasses.dataclass(frozen=True)
class Resolution:
  """A resolved moe.backend.

  name: the concrete backend, a key of backends.BACKENDS.
  reason: why, for the log ('explicit', 'cpu: no probe', 'probe passed', ...).
  failures: {backend: failure} of the probed candidates that failed.
  """

  name: str
  reason: str
  failures: dict[str, str] = dataclasses.field(default_factory=dict)


class InjectedFailure(RuntimeError):
  """Raised inside a probe by the `_fail` / MOE_JAX_BACKEND_PROBE_FAIL hook."""


def group_sizes_for(shape: ProbeShape) -> np.ndarray:
  """[E] int32 unpadded rows per expert: uneven, group 1 empty.

  They sum to slots - slots // 32; the remaining slots go to no expert.
  """
  e = shape.experts
  weights = np.array([(3 * i + 1) % 7 + 1 for i in range(e)], np.int64)
  weights[1] = 0
  total = shape.slots - shape.slots // 32
  sizes = total * weights // weights.sum()
  sizes[0] += total - sizes.sum()
  return sizes.astype(np.int32)


def probe_problem(shape: ProbeShape, dtype: str, row_alignment: int = 1,
                  row_multiple: int = 1) -> dict[str, Any]:
  """A dispatched gmm problem laid out for a backend's row alignment.

  Returns:
    {'x': [R, D], 'w': [E, D, F], 'g': [R, F] output cotangent, all `dtype`;
     'group_sizes': [E] int32 padded as dispatch pads them}. R is
    dispatch.num_rows for the slots, so the rows past the groups are there.
  """
  sizes = group_sizes_for(shape)
  padded = -(-sizes // row_alignment) * row_alignment
  r = dispatch.num_rows(shape.slots, shape.experts, row_alignment,
                        row_multiple)
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (r, shape.d), jnp.float32)
  w = jax.random.normal(kw, (shape.experts, shape.d, shape.f),
                        jnp.float32) / np.sqrt(shape.d)
  g = jax.random.normal(kg, (r, shape.f), jnp.float32)
  return {'x': x.astype(dtype), 'w': w.astype(dtype), 'g': g.astype(dtype),
          'group_sizes': jnp.asarray(padded, jnp.int32)}


def reference(x, w, group_sizes, g) -> tuple[np.ndarray, ...]:
  """(y [R, F], dx [R, D], dw [E, D, F]) by a loop over groups, float64.

  On the host in NumPy: an oracle that shares no compiler or device with the
  backend under test, and costs no compile at start-up.
  """
  # Through float32 on the device: NumPy converts bfloat16 slowly.
  x, w, g = (np.asarray(jnp.asarray(a, jnp.float32), np.float64)
             for a in (x, w, g))
  sizes = np.asarray(group_sizes, np.int64)
  ends = np.cumsum(sizes)
  y = np.zeros((x.shape[0], w.shape[2]))
  dx = np.zeros_like(x)
  dw = np.zeros_like(w)
  for e, (start, end) in enumerate(zip(ends - sizes, ends)):
    rows = slice(int(start), int(end))
    y[rows] = x[rows] @ w[e]
    dx[rows] = g[rows] @ w[e].T
    dw[e] = x[rows].T @ g[rows]
  # Rows past sum(group_sizes) belong to no group: y and dx stay 0 there.
  return y, dx, dw


def _candidate(gmm, x, w, group_sizes, g):
  """(y, dx, dw) of a backend's gmm and its VJP (its custom VJP, if any)."""
  y, vjp = jax.vjp(lambda x, w: gmm(x, w, group_sizes), x, w)
  dx, dw = vjp(g)
  return y, dx, dw


def _relative_error(got, want) -> float:
  """max |got - want| / max |want| (nan when got holds a nan or inf)."""
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  if got.shape != want.shape:
    return float('nan')
  scale = max(float(np.max(np.abs(want))), 1e-6)
  return float(np.max(np.abs(got - want))) / scale


def probe(name: str, shape: ProbeShape = ProbeShape(), *,
          fail: bool = False) -> str | None:
  """Runs backend `name` on the probe problem; None if it passes.

  Returns:
    None, or the failure: 'Type: first line of the message' for an exception
    (compile or run), or the dtype, output and error past the tolerance.
  """
  backend = backends.get_backend(name)
  # The probe moves its inputs and results between host and device on
  # purpose, also in debug runs that disallow implicit transfers.
  with jax.transfer_guard('allow'):
    return _probe(name, backend, shape, fail)


def _probe(name, backend, shape, fail):
  try:
    if fail:
      raise InjectedFailure(
          f'{name} made to fail on purpose (_fail / {FAIL_ENV})')
    for dtype in shape.dtypes:
      p = probe_problem(shape, dtype, backend.row_alignment,
                        backend.row_multiple)
      args = (p['x'], p['w'], p['group_sizes'], p['g'])
      got = jax.jit(functools.partial(_candidate, backend.gmm))(*args)
      got = jax.block_until_ready(got)
      want = reference(*args)
      for what, a, b in zip(('y', 'dx', 'dw'), got, want):
        err = _relative_error(a, b)
        # `not <=` also catches nan.
        if not err <= TOLERANCES[dtype]:
          return (f'{dtype} {what}: max error {err:.3g} of max |reference| '
                  f'(tolerance {TOLERANCES[dtype]:g})')
  except Exception as e:  # pylint: disable=broad-except
    # Lowering, compilation and launch errors all mean "not usable here".
    first = (str(e).strip().splitlines() or [''])[0]
    if len(first) > _MAX_MESSAGE:
      first = first[:_MAX_MESSAGE] + '...'
    return f'{type(e).__name__}: {first}'
  return None


def _env_failures() -> frozenset[str]:
  text = os.environ.get(FAIL_ENV, '')
  return frozenset(n.strip() for n in text.split(',') if n.strip())


def resolve_backend(name: str, *, platform: str | None = None,
                    probe_shape: ProbeShape = ProbeShape(),
                    _fail: set[str] | frozenset[str] = frozenset()
                    ) -> Resolution:
  """The concrete backend for moe.backend=`name` on `platform`.

  Args:
    name: 'auto' or a key of backends.BACKENDS (returned unchanged).
    platform: the JAX platform; None: jax.default_backend().
    probe_shape: the probe problem (tests shrink it).
    _fail: test hook, backends whose probe must fail (joined with the
      comma list in $MOE_JAX_BACKEND_PROBE_FAIL).

  Returns:
    A Resolution; cached per process for equal arguments (and env hook).

  Raises:
    ValueError: `name` is not a known backend (naming moe.backend).
    RuntimeError: on a GPU, every candidate failed its probe.
  """
  if name not in CHOICES:
    raise ValueError(f'moe.backend: expected one of {list(CHOICES)}, got '
                     f'{name!r}')
  if name != AUTO:
    return Resolution(name, 'explicit')
  fail = frozenset(_fail) | _env_failures()
  unknown = sorted(fail - set(backends.BACKENDS))
  if unknown:
    raise ValueError(f'{FAIL_ENV} / _fail: expected names among '
                     f'{sorted(backends.BACKENDS)}, got {unknown}')
  platform = (platform or jax.default_backend()).lower()
  return _resolve_auto(platform, probe_shape, fail)


@functools.cache
def _resolve_auto(platform: str, shape: ProbeShape,
                  fail: frozenset[str]) -> Resolution:
  if platform not in GPU_PLATFORMS:
    return Resolution('blocked', f'{platform}: no probe')
  failures = {}
  for candidate in PROBE_ORDER:
    failure = probe(candidate, shape, fail=candidate in fail)
    if failure is None:
      break
    failures[candidate] = failure
  else:
    raise RuntimeError(
        'moe.backend=auto: every candidate backend failed its start-up probe '
        f'on {platform}: ' + '; '.join(f'{n}: {f}'
                                       for n, f in failures.items()) +
        '. Name a backend (--config.moe.backend=...) to skip the probe.')
  if failures:
    logging.warning(
        'moe.backend=auto: %s failed the start-up probe on %s (%s); using '
        '%s. The run is correct but slower than with %s.',
        ', '.join(failures), platform,
        '; '.join(f'{n}: {f}' for n, f in failures.items()), candidate,
        PROBE_ORDER[0])
    return Resolution(candidate, f'{platform}: probe fell back',
                      dict(failures))
  return Resolution(candidate, f'{platform}: probe passed')


def clear_cache() -> None:
  """Forgets cached resolutions (tests; a changed environment hook)."""
  _resolve_auto.cache_clear()


def resolve_config(config) -> Resolution | None:
  """Resolves config.moe.backend in place, before the model is built.

  Logs e.g. 'moe.backend=auto -> blocked (cpu: no probe)'. An explicit name
  is validated and kept. Call it before the resolved config is written, so
  config.json names the concrete backend, and after init_from_hf.resolve
  (which decides model.dense_ffn of an HF-initialised config).

  Args:
    config: an experiment ConfigDict.

  Returns:
    The Resolution; None for a dense model (no `moe` sub-dict, or
    model.dense_ffn), whose moe.backend is left as it is.
  """
  if 'moe' not in config or ('model' in config and config.model.dense_ffn):
    return None
  requested = config.moe.backend
  resolution = resolve_backend(requested)
  if resolution.name != requested:
    with config.unlocked():
      config.moe.backend = resolution.name
    logging.info('moe.backend=%s -> %s (%s)', requested, resolution.name,
                 resolution.reason)
  else:
    logging.info('moe.backend=%s (%s)', requested, resolution.reason)
  return resolution
