"""Checkpointer faults on small pytrees: a changed model, flipped bytes, stray
uncommitted directories and failed saves.

Each test writes its checkpoints under tmp_path; tests/fixtures is only read
(copied first where a test restores from it).
"""

import errno
import glob
import logging
import os
import pathlib
import shutil
import threading
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax import checkpoint as checkpoint_lib

LEGACY = (pathlib.Path(__file__).resolve().parent / 'fixtures' /
          'legacy_ckpt_smoe' / 'checkpoints')


@flax.struct.dataclass
class State:
  """A TrainState-like tree: a dataclass of dicts and tuples."""
  step: jax.Array
  params: dict
  opt_state: tuple


def make_state(seed: int, vocab: int = 512, layers: int = 2,
               dtype=jnp.float32) -> State:
  rng = np.random.default_rng(seed)
  params = {'embed': {'embedding': jnp.asarray(
      rng.normal(size=(vocab, 64)), jnp.float32)}}
  for i in range(layers):
    params[f'layer_{i}'] = {'w': jnp.asarray(rng.normal(size=(16, 16)), dtype)}
  return State(step=jnp.int32(seed), params=params,
               opt_state=(jnp.int32(seed), jax.tree.map(jnp.zeros_like,
                                                        params)))


def abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def saved_run(directory, steps=(1, 2), **kwargs) -> dict[int, State]:
  """Saves make_state(step) at each step and closes; returns the states."""
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3, **kwargs)
  states = {}
  for step in steps:
    states[step] = make_state(step)
    checkpoints.save(step, states[step], {'position': step})
  checkpoints.close()
  return states


def test_round_trip_writes_checksums_that_verify_after_reopening(tmp_path):
  directory = tmp_path / 'checkpoints'
  states = saved_run(directory)
  for step in (1, 2):
    assert (directory / str(step) / checkpoint_lib.CHECKSUMS).is_file()
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  step, state, data = checkpoints.restore_latest(abstract(states[2]))
  assert (step, data) == (2, {'position': 2})
  assert_trees_equal(state, states[2])
  # A further save (retention, metrics) leaves the old checksums valid.
  checkpoints.save(3, make_state(3), {'position': 3})
  checkpoints.close()
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  assert checkpoints.all_steps() == [1, 2, 3]
  for step in (1, 2, 3):
    checkpoints.restore(step, abstract(states[2]))
  checkpoints.close()
  assert not glob.glob(str(directory / '*.corrupt-*'))


def test_synchronous_save_is_checksummed_at_once(tmp_path):
  directory = tmp_path / 'checkpoints'
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3,
                                            asynchronous=False)
  checkpoints.save(1, make_state(1), {'position': 1})
  assert (directory / '1' / checkpoint_lib.CHECKSUMS).is_file()
  checkpoints.close()


def test_changed_model_raises_mismatch_and_moves_nothing(tmp_path):
  directory = tmp_path / 'checkpoints'
  saved_run(directory)
  before = sorted(os.listdir(directory))
  # Another vocabulary, a third layer and a bf16 layer: the config changed.
  expected = abstract(make_state(0, vocab=1000, layers=3))
  expected.params['layer_0']['w'] = jax.ShapeDtypeStruct(
      (16, 16), jnp.bfloat16, sharding=expected.params['layer_0']['w'].sharding)
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  with pytest.raises(checkpoint_lib.CheckpointMismatch) as info:
    checkpoints.restore_latest(expected)
  checkpoints.close()
  error = info.value
  assert isinstance(error, ValueError)
  assert (error.step, error.directory) == (2, str(directory))
  assert ('params/embed/embedding: saved (512, 64) float32, expected '
          '(1000, 64) float32') in error.differences
  assert 'params/layer_2/w missing in the checkpoint' in error.differences
  assert ('params/layer_0/w: saved (16, 16) float32, expected (16, 16) '
          'bfloat16') in error.differences
  assert ('opt_state/1/embed/embedding: saved (512, 64) float32, expected '
          '(1000, 64) float32') in error.differences
  assert 'params/layer_2/w missing in the checkpoint' in str(error)
  assert sorted(os.listdir(directory)) == before


def test_mismatch_lists_ten_paths_and_keeps_all_on_the_error(tmp_path):
  directory = tmp_path / 'checkpoints'
  saved_run(directory, steps=(1,))
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  with pytest.raises(checkpoint_lib.CheckpointMismatch) as info:
    checkpoints.restore(1, abstract(make_state(0, layers=14)))
  checkpoints.close()
  # 12 new layers, each in params and in the optimiser state.
  assert len(info.value.differences) == 24
  assert str(info.value).count('missing in the checkpoint') == 10
  assert 'and 14 more' in str(info.value)
  # A checkpoint entry the expected tree lacks is named too.
  with pytest.raises(checkpoint_lib.CheckpointMismatch) as info:
    checkpoint_lib.Checkpointer(directory, keep=3).restore(
        1, abstract(make_state(0, layers=1)))
  assert ('params/layer_1/w in the checkpoint but not expected'
          in info.value.differences)


def flip_a_byte(step_dir: pathlib.Path) -> pathlib.Path:
  """Flips one bit in the middle of the largest file under `state/`."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 0x01
  largest.write_bytes(bytes(data))
  return largest


def test_flipped_byte_is_set_aside_and_the_previous_one_restored(
    tmp_path, caplog):
  directory = tmp_path / 'checkpoints'
  states = saved_run(directory)
  damaged = flip_a_byte(directory / '2')
  assert 'ocdbt.process_0' in str(damaged)
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  with caplog.at_level(logging.ERROR):
    step, state, _ = checkpoints.restore_latest(abstract(states[1]))
  checkpoints.close()
  assert step == 1
  assert_trees_equal(state, states[1])
  assert glob.glob(str(directory / '2.corrupt-*'))
  assert not (directory / '2').exists()
  # The error names the damaged file.
  assert str(damaged.relative_to(directory / '2')) in caplog.text
  assert 'could not be restored' in caplog.text


@pytest.mark.parametrize('error', [
    PermissionError(errno.EACCES, 'Permission denied'),
    OSError(errno.ENOSPC, 'No space left on device'),
    MemoryError('out of memory')])
def test_environment_errors_raise_and_set_nothing_aside(tmp_path, monkeypatch,
                                                        error):
  # They would fail on every older checkpoint as well: moving each aside
  # would silently restart the run from scratch.
  directory = tmp_path / 'checkpoints'
  states = saved_run(directory)
  before = sorted(os.listdir(directory))
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)

  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(checkpoints, 'restore', fail)
  with pytest.raises(type(error)):
    checkpoints.restore_latest(abstract(states[1]))
  checkpoints.close()
  assert sorted(os.listdir(directory)) == before


def test_checkpoint_without_checksums_restores_unverified(tmp_path, caplog):
  directory = tmp_path / 'checkpoints'
  shutil.copytree(LEGACY, directory)
  before = sorted(os.listdir(directory))
  saved = ocp.PyTreeCheckpointer().metadata(
      directory / '2' / 'state').item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  expected = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  with caplog.at_level(logging.INFO):
    step, state, data = checkpoints.restore_latest(expected)
  checkpoints.close()
  assert step == 2 and int(state['step']) == 2 and data
  assert f'has no {checkpoint_lib.CHECKSUMS}' in caplog.text
  assert sorted(os.listdir(directory)) == before


def test_uncommitted_directory_is_ignored_and_later_saves_work(
    tmp_path, caplog):
  directory = tmp_path / 'checkpoints'
  states = saved_run(directory)
  # A copy of a checkpoint's items without orbax's commit markers.
  stray = directory / '999'
  stray.mkdir()
  for item in ('state', 'data'):
    shutil.copytree(directory / '2' / item, stray / item)
  with caplog.at_level(logging.WARNING):
    checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  assert str(stray) in caplog.text
  step, state, _ = checkpoints.restore_latest(abstract(states[2]))
  assert step == 2
  assert_trees_equal(state, states[2])
  checkpoints.save(3, make_state(3), {'position': 3})
  checkpoints.close()
  assert checkpoint_lib.Checkpointer(directory, keep=3).all_steps() == [
      1, 2, 3]
  assert glob.glob(str(directory / '999.uncommitted-*'))


def test_save_of_an_old_step_is_an_error_not_a_silent_skip(tmp_path):
  directory = tmp_path / 'checkpoints'
  saved_run(directory)
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=3)
  with pytest.raises(checkpoint_lib.CheckpointSaveError, match='declined'):
    checkpoints.save(1, make_state(1), {'position': 1})
  checkpoints.close()


def non_daemon_threads() -> list[threading.Thread]:
  return [t for t in threading.enumerate()
          if t is not threading.main_thread() and not t.daemon and
          t.is_alive()]


def test_unwritable_directory_fails_the_save_at_once(tmp_path):
  directory = tmp_path / 'checkpoints'
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=1)
  state = make_state(1)
  checkpoints.save(1, state, {'position': 1})
  checkpoints.wait()
  # Root ignores permission bits: a file where the directory was is
  # unwritable for anyone.
  moved = tmp_path / 'moved'
  os.rename(directory, moved)
  directory.write_text('not a directory')
  start = time.monotonic()
  with pytest.raises(checkpoint_lib.CheckpointSaveError) as info:
    checkpoints.save(2, make_state(2), {'position': 2})
  checkpoints.close()
  assert time.monotonic() - start < 30
  assert info.value.step == 2
  assert str(directory) in str(info.value)
  assert 'Not a directory' in info.value.cause
  # No writer thread is left waiting for the directory (that held up the
  # exit of the process for 5 minutes).
  deadline = time.monotonic() + 10
  while non_daemon_threads() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not non_daemon_threads()
  directory.unlink()
  os.rename(moved, directory)
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=1)
  step, restored, _ = checkpoints.restore_latest(abstract(state))
  checkpoints.close()
  assert step == 1
  assert_trees_equal(restored, state)


@pytest.mark.parametrize('error', [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    # As tensorstore reports it for an array write.
    ValueError('RESOURCE_EXHAUSTED: Error writing "params.w/0.0" in OCDBT '
               'database: Failed to write 74817 bytes to file 4: No space '
               "left on device [os_error_code='28']")])
def test_disk_full_while_writing_raises_one_clear_error(tmp_path,
                                                        monkeypatch, error):
  directory = tmp_path / 'checkpoints'
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=1)
  state = make_state(1)
  checkpoints.save(1, state, {'position': 1})
  checkpoints.wait()

  async def disk_full(*args, **kwargs):
    raise error

  # The JSON item is written by orbax's background thread, like the arrays.
  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', disk_full)
  checkpoints.save(2, make_state(2), {'position': 2})
  with pytest.raises(checkpoint_lib.CheckpointSaveError) as info:
    checkpoints.wait()
  assert info.value.step == 2
  assert info.value.cause.startswith('[Errno 28] No space left on device')
  assert str(directory) in str(info.value)
  assert 'step 1, intact' in str(info.value)
  assert not (directory / '2').exists()
  monkeypatch.undo()
  checkpoints.close()
  # The partial save is gone; the last good checkpoint is untouched.
  assert sorted(os.listdir(directory)) == ['1']
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=1)
  step, restored, _ = checkpoints.restore_latest(abstract(state))
  assert step == 1
  assert_trees_equal(restored, state)
  checkpoints.save(3, make_state(3), {'position': 3})
  checkpoints.close()
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=1)
  assert checkpoints.all_steps() == [3]
  checkpoints.close()


def test_disk_full_before_writing_fails_the_save_at_once(tmp_path,
                                                         monkeypatch):
  directory = tmp_path / 'checkpoints'
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=1)
  state = make_state(1)
  checkpoints.save(1, state, {'position': 1})
  checkpoints.wait()
  usage = shutil.disk_usage(directory)
  monkeypatch.setattr(checkpoint_lib.shutil, 'disk_usage',
                      lambda _: usage._replace(free=1024))
  with pytest.raises(checkpoint_lib.CheckpointSaveError,
                     match='No space left on device'):
    checkpoints.save(2, make_state(2), {'position': 2})
  monkeypatch.undo()
  checkpoints.close()
  assert sorted(os.listdir(directory)) == ['1']
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=1)
  step, restored, _ = checkpoints.restore_latest(abstract(state))
  checkpoints.close()
  assert step == 1
  assert_trees_equal(restored, state)
