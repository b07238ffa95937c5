"""train.attention: the cuDNN / XLA choice (moe_jax/models/attention_probe.py).

No GPU here: the GPU branch is exercised with platform='gpu' on the CPU,
where cuDNN attention cannot lower, so the probe must fail and fall back to
the XLA path with one warning.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import attention_probe
from moe_jax.models import decoder


@pytest.fixture(autouse=True)
def fresh_cache():
  attention_probe.resolve.cache_clear()
  yield
  attention_probe.resolve.cache_clear()


def test_cpu_and_full_precision_never_probe(monkeypatch):
  calls = []
  monkeypatch.setattr(attention_probe, 'probe',
                      lambda *a, **k: calls.append(a) or None)
  assert attention_probe.resolve('auto', dtype='bfloat16') == 'xla'
  assert attention_probe.resolve('auto', dtype='float32',
                                 platform='gpu') == 'xla'
  assert attention_probe.resolve('cudnn', dtype='float32') == 'cudnn'
  assert not calls


@pytest.mark.parametrize('inject', [False, True])
def test_gpu_probe_failure_falls_back_with_one_warning(inject, monkeypatch):
  warnings = []
  monkeypatch.setattr(attention_probe.logging, 'warning',
                      lambda msg, *args: warnings.append(msg % args))
  choice = attention_probe.resolve('auto', dtype='bfloat16', platform='gpu',
                                   _fail=inject)
  assert choice == 'xla'
  assert len(warnings) == 1 and 'cuDNN attention failed' in warnings[0]
  if inject:
    assert 'injected' in warnings[0]


def test_unknown_name_names_the_field():
  with pytest.raises(ValueError, match='train.attention'):
    attention_probe.resolve('flash', dtype='bfloat16')


def test_padded_calls_take_the_xla_path():
  """With a padding mask the 'cudnn' model computes what 'xla' does (on a
  CPU, an actual cuDNN call would fail to lower)."""
  kwargs = dict(num_heads=2, head_dim=8, num_layers=1, num_kv_heads=1)
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], bool)[:, None, None, :]
  xla = decoder.Attention(**kwargs, implementation='xla')
  fused = decoder.Attention(**kwargs, implementation='cudnn')
  params = xla.init(jax.random.key(1), x, positions, mask)
  np.testing.assert_array_equal(fused.apply(params, x, positions, mask),
                                xla.apply(params, x, positions, mask))
