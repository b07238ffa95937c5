"""moe.backend='auto': no probe on CPU, the GPU probe and its fallback.

The GPU path runs here with platform='gpu' forced: the candidates run on the
CPU (the Pallas kernel in interpret mode) on a shrunken probe problem.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from moe_jax.moe import backend_probe
from moe_jax.moe import backends

# Small enough for interpret mode (~3 s a dtype, mostly compile), still with
# uneven groups, an empty group and rows past the groups.
SMALL = backend_probe.ProbeShape(slots=128, experts=4, d=32, f=64)
# The fallback mechanics need one dtype only.
SMALL_F32 = dataclasses.replace(SMALL, dtypes=('float32',))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
  monkeypatch.delenv(backend_probe.FAIL_ENV, raising=False)
  backend_probe.clear_cache()
  yield
  backend_probe.clear_cache()


@pytest.fixture
def probe_calls(monkeypatch):
  """The names `backend_probe.probe` was called with (it still runs)."""
  calls = []
  real = backend_probe.probe

  def counting(name, *args, **kwargs):
    calls.append(name)
    return real(name, *args, **kwargs)

  monkeypatch.setattr(backend_probe, 'probe', counting)
  return calls


def _probe_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and 'moe.backend' in r.getMessage()]


def test_probe_problem_has_empty_group_and_rows_past_groups():
  sizes = backend_probe.group_sizes_for(SMALL)
  assert sizes[1] == 0 and len(set(sizes.tolist())) == len(sizes)
  assert 0 < sizes.sum() < SMALL.slots
  p = backend_probe.probe_problem(SMALL, 'bfloat16', row_alignment=16,
                                  row_multiple=2)
  assert p['x'].dtype == jnp.bfloat16 and p['x'].shape[0] % 32 == 0
  assert all(s % 16 == 0 for s in p['group_sizes'].tolist())
  assert int(p['group_sizes'].sum()) < p['x'].shape[0]


@pytest.mark.parametrize('platform', ['cpu', 'tpu', None])
def test_auto_off_gpu_is_blocked_without_probe(platform, probe_calls):
  if platform is None and jax.default_backend() == 'gpu':
    pytest.skip('the default platform is a GPU')
  r = backend_probe.resolve_backend('auto', platform=platform)
  assert r.name == 'blocked' and r.failures == {}
  assert 'no probe' in r.reason
  assert probe_calls == []


@pytest.mark.parametrize('name', sorted(backends.BACKENDS))
def test_explicit_name_is_kept_without_probe(name, probe_calls):
  r = backend_probe.resolve_backend(name, platform='gpu')
  assert (r.name, r.reason) == (name, 'explicit')
  assert probe_calls == []


def test_unknown_hook_name_is_an_error(monkeypatch):
  monkeypatch.setenv(backend_probe.FAIL_ENV, 'palas')
  with pytest.raises(ValueError, match=backend_probe.FAIL_ENV):
    backend_probe.resolve_backend('auto', platform='gpu')


def test_unknown_name_names_the_field_and_choices():
  with pytest.raises(ValueError, match='moe.backend') as e:
    backend_probe.resolve_backend('triton')
  for name in ('auto', *backends.BACKENDS):
    assert repr(name) in str(e.value)
  assert "'triton'" in str(e.value)


def test_gpu_probe_passes_pallas_once(probe_calls, caplog):
  with caplog.at_level(logging.INFO):
    r = backend_probe.resolve_backend('auto', platform='gpu',
                                      probe_shape=SMALL)
    again = backend_probe.resolve_backend('auto', platform='gpu',
                                          probe_shape=SMALL)
  assert r.name == 'pallas' and r.failures == {}, r
  assert again is r                      # cached: probed once per process
  assert probe_calls == ['pallas']
  assert _probe_warnings(caplog) == []


def test_gpu_probe_falls_back_with_one_warning(probe_calls, caplog):
  with caplog.at_level(logging.WARNING):
    r = backend_probe.resolve_backend('auto', platform='gpu',
                                      probe_shape=SMALL_F32, _fail={'pallas'})
    backend_probe.resolve_backend('auto', platform='gpu', probe_shape=SMALL_F32,
                                  _fail={'pallas'})
  assert r.name == 'blocked'
  assert list(r.failures) == ['pallas']
  assert r.failures['pallas'].startswith('InjectedFailure: ')
  assert probe_calls == ['pallas', 'blocked']
  [warning] = _probe_warnings(caplog)
  assert 'pallas' in warning and 'InjectedFailure' in warning
  assert 'using blocked' in warning


def test_env_hook_fails_candidates_end_to_end(monkeypatch, caplog):
  monkeypatch.setenv(backend_probe.FAIL_ENV, 'pallas, blocked')
  with caplog.at_level(logging.WARNING):
    r = backend_probe.resolve_backend('auto', platform='gpu',
                                      probe_shape=SMALL_F32)
  assert r.name == 'ragged_dot'
  assert list(r.failures) == ['pallas', 'blocked']
  [warning] = _probe_warnings(caplog)
  assert 'pallas' in warning and 'blocked' in warning


def test_wrong_numbers_fail_the_probe(monkeypatch):
  # A kernel that runs but misplaces a group boundary by one row.
  def off_by_one(x, w, group_sizes):
    return backends.gmm_loop(x, w, group_sizes.at[0].add(1).at[2].add(-1))

  monkeypatch.setitem(backends.BACKENDS, 'pallas',
                      backends.Backend(off_by_one))
  failure = backend_probe.probe('pallas', SMALL)
  assert failure is not None and failure.startswith('float32 y: max error')
  # A correct backend passes, also where implicit transfers are disallowed.
  with jax.transfer_guard('disallow'):
    assert backend_probe.probe('loop', SMALL) is None


def test_every_candidate_failing_raises_listing_all(probe_calls):
  fail = {'pallas', 'blocked', 'ragged_dot'}
  with pytest.raises(RuntimeError, match='moe.backend=auto') as e:
    backend_probe.resolve_backend('auto', platform='gpu', probe_shape=SMALL,
                                  _fail=fail)
  for name in fail:
    assert f'{name}: InjectedFailure' in str(e.value)
  assert probe_calls == list(backend_probe.PROBE_ORDER)


def _config(backend, dense_ffn=False):
  config = ml_collections.ConfigDict({'moe': {'backend': backend},
                                      'model': {'dense_ffn': dense_ffn}})
  config.lock()
  return config


def test_resolve_config_writes_the_concrete_name(probe_calls, caplog):
  config = _config('auto')
  with caplog.at_level(logging.INFO):
    r = backend_probe.resolve_config(config)
  if jax.default_backend() == 'cpu':
    assert r.name == 'blocked' and probe_calls == []
    assert 'moe.backend=auto -> blocked (cpu: no probe)' in caplog.text
  assert config.moe.backend == r.name
  assert config.moe.backend in backends.BACKENDS
  assert '"backend": "auto"' not in config.to_json()
  # Explicit names stay; a resolved config resolves to itself.
  explicit = _config('ragged_dot')
  assert backend_probe.resolve_config(explicit).name == 'ragged_dot'
  assert explicit.moe.backend == 'ragged_dot'
  with pytest.raises(ValueError, match='moe.backend'):
    backend_probe.resolve_config(_config('nope'))


def test_resolve_config_leaves_dense_models_alone(probe_calls):
  config = _config('auto', dense_ffn=True)
  assert backend_probe.resolve_config(config) is None
  assert config.moe.backend == 'auto'
  assert backend_probe.resolve_config(
      ml_collections.ConfigDict({'model': {'dense_ffn': True}})) is None
  assert probe_calls == []
