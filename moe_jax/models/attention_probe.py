"""Which dot_product_attention implementation a model uses: train.attention.

  'xla'    jax.nn.dot_product_attention's XLA path: the [B, H, S, S] scores
           are materialised; every platform, every dtype.
  'cudnn'  cuDNN's fused (flash) attention: no score matrix in memory; a
           GPU with cuDNN, bfloat16 / float16 only.
  'auto'   'cudnn' on a GPU when the compute dtype is half precision and a
           start-up probe passes (forward and gradient of a small causal
           problem against the XLA path), else 'xla'; a failed probe is one
           warning naming the failure, never a failed run.

JAX 0.10's dot_product_attention with no implementation takes the XLA path
even on a GPU, so the choice is made here. The decoder uses cuDNN only for
unmasked (causal) calls; a padding mask takes the XLA path.
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

CHOICES = ('auto', 'xla', 'cudnn')
_GPU_PLATFORMS = ('gpu', 'cuda')
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Relative max error of the cuDNN output and gradients vs the XLA path.
TOLERANCE = 2e-2


def _attention_and_grads(implementation: str, q, k, v):
  """(out, dq, dk, dv) of causal attention, float32."""
  def loss(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       implementation=implementation)
    return jnp.sum(out.astype(jnp.float32) ** 2), out
  (_, out), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(a, np.float32) for a in (out, *grads)]


def probe(dtype, *, fail: bool = False) -> str | None:
  """None when cuDNN attention matches the XLA path, else the failure.

  The problem: B 2, S 128, 4 query heads over 2 K/V heads (GQA), head 64.
  """
  try:
    if fail:
      raise RuntimeError('failure injected by the test hook')
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 128, 4, 64), dtype)
    k = jax.random.normal(keys[1], (2, 128, 2, 64), dtype)
    v = jax.random.normal(keys[2], (2, 128, 2, 64), dtype)
    reference = _attention_and_grads('xla', q, k, v)
    fused = _attention_and_grads('cudnn', q, k, v)
  except Exception as e:  # pylint: disable=broad-except
    # Any failure to lower, compile or run means "not on this machine".
    return f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
  for name, ref, got in zip(('out', 'dq', 'dk', 'dv'), reference, fused):
    error = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-6)
    if not error <= TOLERANCE:
      return f'{name} differs from the XLA path by {error:.3g} (relative)'
  return None


@functools.cache
def resolve(name: str, *, dtype: str, platform: str | None = None,
            _fail: bool = False) -> str:
  """'xla' or 'cudnn' for train.attention=`name` (see the module docstring).

  Args:
    name: 'auto' | 'xla' | 'cudnn'.
    dtype: the compute dtype (train.dtype).
    platform: default jax.default_backend().
    _fail: test hook: the probe fails.
  """
  if name not in CHOICES:
    raise ValueError(f'train.attention: expected one of {list(CHOICES)}, got '
                     f'{name!r}')
  if name != 'auto':
    return name
  platform = platform or jax.default_backend()
  if platform not in _GPU_PLATFORMS or jnp.dtype(dtype) not in _HALF:
    return 'xla'
  failure = probe(jnp.dtype(dtype), fail=_fail)
  if failure is not None:
    logging.warning('train.attention=auto: cuDNN attention failed its '
                    'start-up check (%s); using the XLA path', failure)
    return 'xla'
  logging.info('train.attention=auto -> cudnn (the probe passed)')
  return 'cudnn'


def resolve_config(config) -> str:
  """Resolves config.train.attention in place; returns the choice."""
  choice = resolve(config.train.attention, dtype=config.train.dtype)
  if choice != config.train.attention:
    with config.unlocked():
      config.train.attention = choice
  return choice
