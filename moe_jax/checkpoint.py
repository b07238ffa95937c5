"""orbax checkpoints of a run: asynchronous, atomic, checksummed, last K plus
the best.

Layout: `<workdir>/checkpoints/<step>/{state,data,checksums.json}`; `state` is
the train state (params, optimiser, router state, step), `data` the grain
iterator state as JSON, so a resumed run reads exactly the batches an
uninterrupted run would; `checksums.json` holds the sha256 of every other file
of the step. A state that has seen no data (a model imported by
`python -m moe_jax.convert`) is saved without `data`; it restores with
iterator state None, i.e. a fresh iterator.

Safety:
  * orbax writes each step into a temporary directory and renames it when
    complete, with a commit marker (`commit_success.txt`, a commit time in
    `_CHECKPOINT_METADATA`). Only committed steps are checkpoints: unfinished
    temporaries are ignored, and a numbered directory without a marker (a
    stray copy) is renamed to `<step>.uncommitted-<time>` with a warning, so
    it is neither restored nor blocks saves of lower steps.
  * Integrity: orbax checks its own tree nodes (OCDBT) but not array data, so
    a flipped byte in a data file restores silently. Once a save has finished
    (at the next `save`, `wait` or `close`) `checksums.json` is written
    (temporary file + rename); restoring verifies it first. A checkpoint
    written without one (older code, or a run killed before its next save)
    is restored unverified.
  * A checkpoint that exists but cannot be read (checksum mismatch, truncated
    or damaged file) is never skipped silently: `restore_latest` logs an
    error naming it, renames it to `<step>.corrupt-<time>` (kept for
    inspection, never deleted) and falls back to the next older one.
  * A checkpoint whose tree differs from the expected state (the model config
    changed on an existing workdir) is not damaged: it raises
    `CheckpointMismatch` naming the differing paths, and nothing is moved.
    Nor is one that fails for a reason of the machine (out of memory,
    permission denied, a full or read-only disk, an unreachable file
    system): that error is raised and nothing is moved, since every older
    checkpoint would fail alike and the run would restart from scratch.
  * A save that fails raises `CheckpointSaveError` naming the directory and
    the cause: at once from `save` when the directory is not writable or the
    disk cannot hold another checkpoint the size of the last one, otherwise
    (a failure while writing in the background) from the next `save`, `wait`
    or `close`. Older checkpoints stay intact: orbax deletes them only after a
    new one is committed.
  * Retention: the `keep` most recent checkpoints plus the one with the lowest
    validation loss (the best is often not the last).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import threading
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

VALID_METRIC = 'valid_loss'
CHECKSUMS = 'checksums.json'
# orbax's commit markers (orbax.checkpoint._src.path.atomicity).
_COMMIT_FILE = 'commit_success.txt'
_STEP_METADATA = '_CHECKPOINT_METADATA'
# Differences listed in a CheckpointMismatch message (all are on the error).
_MAX_LISTED = 10
# How long to wait for orbax's writer threads to stop after a failed save
# before removing its partial directory.
_WRITER_GRACE_S = 60.


class CheckpointMismatch(ValueError):
  """The saved tree differs from the expected one in structure, shape or dtype.

  Attributes:
    directory: the checkpoints directory.
    step: the checkpoint compared.
    differences: every differing path, one readable line each.
  """

  def __init__(self, directory: str, step: int, differences: list[str]):
    self.directory = directory
    self.step = step
    self.differences = list(differences)
    listed = '; '.join(differences[:_MAX_LISTED])
    more = len(differences) - _MAX_LISTED
    super().__init__(
        f'checkpoint {step} in {directory} does not match the expected train '
        f'state ({len(differences)} differences): {listed}'
        + (f'; and {more} more' if more > 0 else ''))


class CheckpointCorrupt(RuntimeError):
  """A file of a checkpoint differs from what was written (checksums.json)."""

  def __init__(self, directory: str, step: int, problem: str):
    self.directory = directory
    self.step = step
    super().__init__(f'checkpoint {step} in {directory}: {problem}')


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written.

  Attributes:
    directory: the checkpoints directory.
    step: the step whose save failed (None if unknown).
    cause: the underlying error in a line, e.g. '[Errno 28] No space left
      on device (OSError)'.
  """

  def __init__(self, directory: str, step: int | None, cause: str,
               latest: int | None):
    self.directory = directory
    self.step = step
    self.cause = cause
    kept = (f'the newest checkpoint on disk is step {latest}, intact'
            if latest is not None else 'no earlier checkpoint is on disk')
    super().__init__(f'checkpoint {step} could not be saved in {directory}: '
                     f'{cause} ({kept})')


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat(tree: Any) -> dict[str, Any]:
  """{'params/embed/embedding': leaf}; dataclass fields, dict keys and
  sequence indices all read alike, as orbax stores them all as dicts/lists."""
  return {'/'.join(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_differences(saved: Any, expected: Any) -> list[str]:
  """Paths whose presence, shape or dtype differ between two trees.

  Args:
    saved: a checkpoint's metadata tree (leaves with .shape and .dtype).
    expected: the tree to restore into (arrays or jax.ShapeDtypeStruct).

  Returns:
    One line per differing path, sorted, e.g. 'params/layer_2 missing in the
    checkpoint' or 'params/embed/embedding: saved (512, 64) float32,
    expected (1000, 64) float32'; empty when the trees agree.
  """
  flat_saved, flat_expected = _flat(saved), _flat(expected)
  out = []
  for path in sorted(set(flat_saved) | set(flat_expected)):
    if path not in flat_saved:
      out.append(f'{path} missing in the checkpoint')
      continue
    if path not in flat_expected:
      out.append(f'{path} in the checkpoint but not expected')
      continue
    a, b = flat_saved[path], flat_expected[path]
    if not all(hasattr(x, 'shape') and hasattr(x, 'dtype') for x in (a, b)):
      continue
    shape_a, shape_b = tuple(a.shape), tuple(b.shape)
    dtype_a, dtype_b = _dtype_name(a.dtype), _dtype_name(b.dtype)
    if shape_a != shape_b or dtype_a != dtype_b:
      out.append(f'{path}: saved {shape_a} {dtype_a}, expected {shape_b} '
                 f'{dtype_b}')
  return out


def _dtype_name(dtype: Any) -> str:
  try:
    return jax.numpy.dtype(dtype).name
  except TypeError:
    return str(dtype)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _step_files(step_dir: str) -> list[str]:
  """Files under `step_dir`, relative, except the checksums and their
  temporaries."""
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      if name == CHECKSUMS or name.startswith(f'.{CHECKSUMS}.'):
        continue
      out.append(os.path.relpath(os.path.join(root, name), step_dir))
  return sorted(out)


def is_committed(step_dir: str) -> bool:
  """Whether orbax finished `step_dir`: it holds a commit marker."""
  if os.path.isfile(os.path.join(step_dir, _COMMIT_FILE)):
    return True
  try:
    with open(os.path.join(step_dir, _STEP_METADATA)) as f:
      return json.load(f).get('commit_timestamp_nsecs') is not None
  except (OSError, ValueError, AttributeError):
    return False


def _describe(error: BaseException) -> str:
  """The root cause of a save failure in a line: the OSError in the chain
  (errno and path) if there is one, else the error's first line, led by the
  OS error that tensorstore reports inside its message."""
  seen, current = set(), error
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    if isinstance(current, OSError) and current.errno is not None:
      return f'{current} ({type(current).__name__})'
    current = current.__cause__ or current.__context__
  lines = str(error).strip().splitlines()
  text = f'{type(error).__name__}: {lines[0] if lines else ""}'
  # tensorstore: "... Failed to write 74817 bytes to file 4: No space left
  # on device [os_error_code='28']".
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    number = int(code.group(1))
    return f'[Errno {number}] {os.strerror(number)} ({text[:200]} ...)'
  return text[:300]


def _size(num_bytes: int) -> str:
  for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
    if num_bytes < 1024 or unit == 'GiB':
      return (f'{num_bytes} {unit}' if unit == 'bytes' else
              f'{num_bytes:.1f} {unit}')
    num_bytes /= 1024
  raise AssertionError('unreachable')


# errno values that describe the machine, not the files: permissions, a
# read-only or full disk, a network file system that dropped or went stale.
_ENVIRONMENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
    errno.ETIMEDOUT, errno.ENOTCONN, errno.ESTALE, errno.EHOSTDOWN})


def _not_the_checkpoint(error: BaseException) -> bool:
  """True for failures that say nothing about the checkpoint's files.

  Running out of memory, or an environment error (permission denied, a full
  or read-only disk, an unreachable file system) would fail on every older
  checkpoint too: setting them all aside would silently restart the run
  from scratch. Such errors are raised instead.
  """
  if isinstance(error, MemoryError) or 'out of memory' in str(error).lower():
    return True
  return isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS


class Checkpointer:
  """Saves and restores (train state, iterator state) under one directory."""

  def __init__(self, directory: str | os.PathLike, *, keep: int,
               asynchronous: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    self._asynchronous = asynchronous
    self._primary = jax.process_index() == 0
    # Steps whose save was started and not yet checksummed.
    self._unhashed: list[int] = []
    # Steps whose save failed: their temporary directories are removed once
    # orbax's writer threads are done with them.
    self._failed: list[int] = []
    self._closed = False
    self._set_aside_uncommitted()
    policy = ocp_policies.AnyPreservationPolicy([
        ocp_policies.LatestN(n=keep),
        ocp_policies.BestN(get_metric_fn=lambda m: m[VALID_METRIC],
                           reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=True,
        enable_async_checkpointing=asynchronous,
        # Creating the step directory in the background means a failure there
        # surfaces one save later, and leaves orbax's writer threads waiting
        # 5 minutes for a directory that never comes (holding up exit).
        async_options=ocp.AsyncOptions(
            create_directories_asynchronously=False))
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()},
        options=options)

  def all_steps(self) -> list[int]:
    """Steps of complete (committed) checkpoints, ascending.

    Waits for a save in progress, so the answer is what is on disk.

    Raises:
      CheckpointSaveError: the save in progress failed.
    """
    self._finish_saves()
    return self._committed_steps()

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (see `all_steps`), or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_state: dict | None,
           valid_loss: float | None = None) -> None:
    """Starts an asynchronous save of `state` and the iterator state.

    `data_state` None (no data read yet) saves no `data` item.

    Raises:
      CheckpointSaveError: this save cannot start (the directory is not
        writable, too little free space), orbax declined the step, or the
        previous save failed while writing in the background.
    """
    self._finish_saves()
    self._remove_failed_saves()
    self._check_writable(step)
    metrics = None if valid_loss is None else {VALID_METRIC: valid_loss}
    try:
      items = {'state': ocp.args.StandardSave(state)}
      if data_state is not None:
        items['data'] = ocp.args.JsonSave(data_state)
      saved = self._manager.save(step, args=ocp.args.Composite(**items),
                                 metrics=metrics)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from None
    if not saved:
      raise CheckpointSaveError(
          self.directory, step,
          f'orbax declined to save it (steps must increase; orbax holds '
          f'{self._manager.latest_step()})', self._committed_steps_or_none())
    self._unhashed.append(step)
    if not self._asynchronous:
      self._finish_saves()

  def restore(self, step: int, abstract_state: Any
              ) -> tuple[Any, dict | None]:
    """(state, iterator state) of `step`; `abstract_state` gives shardings.

    The iterator state is None for a checkpoint saved without one.

    Raises:
      CheckpointCorrupt: a file differs from its recorded checksum.
      CheckpointMismatch: the saved tree differs from `abstract_state`.
    """
    self.verify(step)
    metadata = self._manager.item_metadata(step)['state']
    if metadata is None:
      raise CheckpointCorrupt(self.directory, step,
                              'state/_METADATA could not be read')
    differences = tree_differences(getattr(metadata, 'tree', metadata),
                                   abstract_state)
    if differences:
      raise CheckpointMismatch(self.directory, step, differences)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    # orbax raises for an item the step does not hold.
    has_data = os.path.isdir(os.path.join(self._step_dir(step), 'data'))
    if has_data:
      items['data'] = ocp.args.JsonRestore()
    restored = self._manager.restore(step,
                                     args=ocp.args.Composite(**items))
    return restored['state'], restored['data'] if has_data else None

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[int, Any, dict | None] | None:
    """The newest checkpoint that restores, or None if there is none.

    A checkpoint that fails to restore is renamed aside (see module
    docstring) with an error in the log, and the next older one is tried.

    Raises:
      CheckpointMismatch: the newest checkpoint's tree differs from
        `abstract_state` (nothing is moved aside).
      MemoryError, OSError: an error of the machine, not of the checkpoint
        (nothing is moved aside).
    """
    if self._set_aside_uncommitted():
      self._manager.reload()
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if _not_the_checkpoint(e):
          raise
        aside = self._move_aside(step, 'corrupt')
        logging.error(
            'checkpoint %d in %s could not be restored (%s: %s); moved to %s '
            'and falling back to an older checkpoint.', step, self.directory,
            type(e).__name__, str(e)[:300], aside)
        continue
      return step, state, data_state
    return None

  def best_step(self) -> int | None:
    """The kept checkpoint with the lowest validation loss, if any has one."""
    best = None
    for info in self._manager._checkpoints:  # pylint: disable=protected-access
      if info.metrics and VALID_METRIC in info.metrics:
        if best is None or info.metrics[VALID_METRIC] < best[1]:
          best = (info.step, info.metrics[VALID_METRIC])
    return best[0] if best else None

  def wait(self) -> None:
    """Blocks until every started save is on disk, with its checksums.

    Raises:
      CheckpointSaveError: a save failed.
    """
    self._finish_saves()

  def close(self) -> None:
    """Finishes started saves and releases orbax's resources.

    Raises:
      CheckpointSaveError: a save failed (the resources are released anyway).
    """
    if self._closed:
      return
    self._closed = True
    try:
      self._finish_saves()
    finally:
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-except
        # Already reported by _finish_saves; orbax re-raises it only once.
        logging.info('closing the checkpoint manager: %s', _describe(e))
      self._remove_failed_saves()

  # Saving.

  def _finish_saves(self) -> None:
    """Waits for the save in progress, then checksums the finished ones."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step = self._unhashed[-1] if self._unhashed else None
      self._unhashed = [s for s in self._unhashed if s != step]
      raise self._save_failed(step, e) from None
    for step in self._unhashed:
      step_dir = self._step_dir(step)
      # Retention may already have deleted an older step.
      if self._primary and is_committed(step_dir):
        self._write_checksums(step_dir)
    self._unhashed = []

  def _check_writable(self, step: int) -> None:
    """Raises CheckpointSaveError before a save that could not succeed."""
    probe = os.path.join(self.directory, f'.write-probe-'
                         f'{jax.process_index()}-{os.getpid()}')
    try:
      with open(probe, 'wb') as f:
        f.write(b'0')
      os.remove(probe)
    except OSError as e:
      raise CheckpointSaveError(self.directory, step, _describe(e),
                                self._committed_steps_or_none()) from None
    steps = self._committed_steps()
    if not steps:
      return
    # The next checkpoint of the same model is as large as the last one, and
    # orbax removes old ones only after it is written.
    need = sum(os.path.getsize(os.path.join(self._step_dir(steps[-1]), f))
               for f in _step_files(self._step_dir(steps[-1])))
    usage = shutil.disk_usage(self.directory)
    if usage.total and usage.free < need:
      raise CheckpointSaveError(
          self.directory, step,
          f'No space left on device: {_size(usage.free)} free, the last '
          f'checkpoint (step {steps[-1]}) takes {_size(need)}',
          steps[-1])

  def _save_failed(self, step: int | None,
                   error: BaseException) -> CheckpointSaveError:
    """The error to raise for a failed save."""
    if step is not None:
      self._failed.append(step)
    try:
      # orbax has already dropped the steps this save would have replaced
      # from its list; they are still on disk.
      self._manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass
    return CheckpointSaveError(self.directory, step, _describe(error),
                               self._committed_steps_or_none())

  def _remove_failed_saves(self) -> None:
    """Deletes what failed saves left (frees the space a full disk needs)."""
    if not self._failed:
      return
    # orbax reports the first failed write while its other writer threads
    # (futures._SignalingThread) may still be writing into the directory.
    deadline = time.monotonic() + _WRITER_GRACE_S
    for thread in threading.enumerate():
      if type(thread).__name__ == '_SignalingThread':
        thread.join(max(0., deadline - time.monotonic()))
    if self._primary:
      for step in self._failed:
        for path in glob.glob(os.path.join(
            glob.escape(self.directory), f'{step}.orbax-checkpoint-tmp*')):
          shutil.rmtree(path, ignore_errors=True)
    self._failed = []

  def _write_checksums(self, step_dir: str) -> None:
    """Writes `<step_dir>/checksums.json` atomically (temp file + rename)."""
    files = {rel: _sha256(os.path.join(step_dir, rel))
             for rel in _step_files(step_dir)}
    target = os.path.join(step_dir, CHECKSUMS)
    temporary = os.path.join(step_dir, f'.{CHECKSUMS}.{os.getpid()}')
    with open(temporary, 'w') as f:
      json.dump({'algorithm': 'sha256', 'files': files}, f, indent=0)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, target)

  # Restoring.

  def verify(self, step: int) -> None:
    """Raises CheckpointCorrupt unless every file has its recorded sha256."""
    step_dir = self._step_dir(step)
    path = os.path.join(step_dir, CHECKSUMS)
    if not os.path.exists(path):
      logging.info('checkpoint %d in %s has no %s (written by older code or '
                   'before its save was confirmed): restoring it unverified.',
                   step, self.directory, CHECKSUMS)
      return
    try:
      with open(path) as f:
        files = json.load(f)['files']
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointCorrupt(self.directory, step,
                              f'{CHECKSUMS} is unreadable ({e})') from None
    for rel, digest in sorted(files.items()):
      full = os.path.join(step_dir, rel)
      if not os.path.isfile(full):
        raise CheckpointCorrupt(self.directory, step, f'{rel} is missing')
      if _sha256(full) != digest:
        raise CheckpointCorrupt(
            self.directory, step,
            f'{rel} differs from the sha256 in {CHECKSUMS} (damaged on disk)')

  # The directory.

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _committed_steps(self) -> list[int]:
    return [s for s in sorted(self._manager.all_steps())
            if is_committed(self._step_dir(s))]

  def _committed_steps_or_none(self) -> int | None:
    try:
      steps = self._committed_steps()
    except Exception:  # pylint: disable=broad-except
      return None
    return steps[-1] if steps else None

  def _set_aside_uncommitted(self) -> bool:
    """Renames numbered directories without a commit marker; True if any."""
    if not os.path.isdir(self.directory):
      return False
    strays = [name for name in sorted(os.listdir(self.directory))
              if name.isdigit() and
              os.path.isdir(os.path.join(self.directory, name)) and
              not is_committed(os.path.join(self.directory, name))]
    for name in strays:
      aside = self._rename(int(name), 'uncommitted')
      logging.warning(
          '%s has no orbax commit marker (%s, or a commit time in %s), so it '
          'is not a complete checkpoint: ignored, and moved to %s.',
          os.path.join(self.directory, name), _COMMIT_FILE, _STEP_METADATA,
          aside)
    if strays:
      self._sync('uncommitted')
    return bool(strays)

  def _move_aside(self, step: int, why: str) -> str:
    target = self._rename(step, why)
    self._sync(why)
    self._manager.reload()
    return target

  def _rename(self, step: int, why: str) -> str:
    source = self._step_dir(step)
    target = f'{source}.{why}-{int(time.time())}'
    suffix = 1
    while os.path.exists(target):
      # Set aside twice within a second: keep both.
      target, suffix = f'{source}.{why}-{int(time.time())}-{suffix}', suffix + 1
    if self._primary:
      os.replace(source, target)
    return target

  def _sync(self, name: str) -> None:
    # Every process lists the directory after the primary has renamed.
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moe_jax_checkpoint_{name}')
