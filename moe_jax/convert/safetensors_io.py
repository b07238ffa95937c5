"""safetensors files and sharded checkpoints, read and written without torch.

Format (https://github.com/huggingface/safetensors, formats.md §2):

  [8 bytes]  N, the header length, unsigned little-endian
  [N bytes]  a JSON object {name: {"dtype": "F32", "shape": [...],
             "data_offsets": [begin, end]}, "__metadata__": {str: str}},
             padded with spaces so the data starts 8-byte aligned
  [rest]     the tensors' raw little-endian bytes, C order; offsets are
             relative to the start of this data section

A sharded checkpoint is a directory holding either `model.safetensors` or
`model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {name: shard file}}).

Reading needs only numpy and ml_dtypes (bfloat16, float8), not torch, and
sidesteps safetensors issue #598 (`safe_open(..., 'np')` failing on
bfloat16). `get` reads one tensor's byte range into a fresh array, so peak
memory stays near the largest single tensor, whatever the file size.

Writing always records `"format": "pt"` in `__metadata__`: transformers'
`load_state_dict` refuses a file whose format is missing or unknown. Files
and shard sets appear atomically: written under a temporary name in the
destination directory, then renamed, so an error leaves nothing partial.

All sizes below are in bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import weakref

import ml_dtypes
import numpy as np

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
METADATA_KEY = '__metadata__'
# The reference implementation refuses headers above 100 MB; a larger length
# field is a corrupt file, not a real header.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names and their numpy dtypes (native byte order; the
# file is little-endian, see _to_little_endian).
DTYPES: dict[str, np.dtype] = {
    'F64': np.dtype(np.float64),
    'F32': np.dtype(np.float32),
    'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16),
    # FP8 checkpoints (DeepSeek-V3) use these two.
    'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
    'I64': np.dtype(np.int64),
    'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16),
    'I8': np.dtype(np.int8),
    'U64': np.dtype(np.uint64),
    'U32': np.dtype(np.uint32),
    'U16': np.dtype(np.uint16),
    'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
  """A file that is not a valid safetensors file (bad header, truncated)."""


def _to_little_endian(array: np.ndarray) -> np.ndarray:
  """Swaps bytes on big-endian hosts; a no-op (same array) elsewhere."""
  if sys.byteorder == 'little':
    return array
  return array.byteswap()


def _bytes_view(array: np.ndarray) -> np.ndarray:
  """The bytes of a C-contiguous array as a flat uint8 view (0-d included)."""
  return array.reshape(-1).view(np.uint8)


class _Entry:
  """One tensor's header entry, validated."""

  __slots__ = ('dtype', 'shape', 'begin', 'end')

  def __init__(self, dtype: np.dtype, shape: tuple[int, ...], begin: int,
               end: int):
    self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


def _is_int(value) -> bool:
  # bool is an int subclass, and JSON true is never a valid size.
  return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: str, key: str, raw) -> _Entry:
  """Validates one header entry against what the format requires."""
  where = f'{path}: tensor {key!r}'
  if not isinstance(raw, dict):
    raise SafetensorsError(f'{where}: expected a JSON object with dtype, '
                           f'shape and data_offsets, got {raw!r}')
  name = raw.get('dtype')
  if name not in DTYPES:
    raise SafetensorsError(f'{where}: unknown dtype {name!r}, expected one '
                           f'of {sorted(DTYPES)}')
  shape = raw.get('shape')
  if not (isinstance(shape, list) and
          all(_is_int(d) and d >= 0 for d in shape)):
    raise SafetensorsError(f'{where}: shape must be a list of non-negative '
                           f'integers, got {shape!r}')
  offsets = raw.get('data_offsets')
  if not (isinstance(offsets, list) and len(offsets) == 2 and
          all(_is_int(o) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
    raise SafetensorsError(f'{where}: data_offsets must be [begin, end] with '
                           f'0 <= begin <= end, got {offsets!r}')
  dtype = DTYPES[name]
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if offsets[1] - offsets[0] != nbytes:
    raise SafetensorsError(
        f'{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} '
        f'bytes, expected {nbytes} for shape {shape} x {name} '
        f'({dtype.itemsize} bytes each)')
  return _Entry(dtype, tuple(shape), offsets[0], offsets[1])


class SafetensorsFile:
  """One safetensors file, its header parsed and validated once at open.

  Use as a context manager (or call `close`); `get` reads one tensor at a
  time, so a file larger than memory can be converted tensor by tensor.
  Reads are serialised by a lock, so threads may share one instance.

  Attributes:
    path: the file's path.
    metadata: the header's `__metadata__` ({} when absent).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._lock = threading.Lock()
    self._file = open(self.path, 'rb')
    try:
      self._parse_header()
    except BaseException:
      self._file.close()
      raise

  def _parse_header(self) -> None:
    path, f = self.path, self._file
    size = os.fstat(f.fileno()).st_size
    if size < 8:
      raise SafetensorsError(f'{path}: truncated: {size} bytes, a '
                             'safetensors file has at least 8')
    n = int.from_bytes(f.read(8), 'little')
    if 8 + n > size:
      raise SafetensorsError(f'{path}: header length {n} runs past the end '
                             f'of the file ({size} bytes, so at most '
                             f'{size - 8})')
    if n > MAX_HEADER_BYTES:
      raise SafetensorsError(f'{path}: header length {n} exceeds '
                             f'{MAX_HEADER_BYTES} bytes')
    try:
      header = json.loads(f.read(n).decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f'{path}: header is not valid UTF-8 JSON: '
                             f'{e}') from e
    if not isinstance(header, dict):
      raise SafetensorsError(f'{path}: header must be a JSON object, got '
                             f'{type(header).__name__}')
    metadata = header.pop(METADATA_KEY, {})
    if not (isinstance(metadata, dict) and
            all(isinstance(v, str) for v in metadata.values())):
      raise SafetensorsError(f'{path}: {METADATA_KEY} must map strings to '
                             f'strings, got {metadata!r}')
    self.metadata: dict[str, str] = metadata
    self._entries = {k: _parse_entry(path, k, v) for k, v in header.items()}

    # Ranges must not overlap (a writer bug or a corrupt header). Gaps are
    # accepted: the reference writer never leaves one, but nothing is lost.
    previous, previous_end = None, 0
    for key, e in sorted(self._entries.items(),
                         key=lambda kv: (kv[1].begin, kv[1].end)):
      if e.begin < previous_end:
        raise SafetensorsError(
            f'{path}: tensor {key!r} at data_offsets [{e.begin}, {e.end}] '
            f'overlaps tensor {previous!r} ending at {previous_end}')
      if e.end > previous_end:
        previous, previous_end = key, e.end
    self._data_start = 8 + n
    expected = self._data_start + previous_end
    if size < expected:
      raise SafetensorsError(
          f'{path}: truncated: the header describes {expected} bytes '
          f'(tensor {previous!r} ends at {expected}), the file has {size}')
    if size > expected:
      # The reference reader refuses these too: the file is not what its
      # header says (e.g. two files concatenated).
      raise SafetensorsError(f'{path}: {size - expected} bytes past the last '
                             f'tensor: expected {expected} bytes, the file '
                             f'has {size}')

  def _entry(self, key: str) -> _Entry:
    try:
      return self._entries[key]
    except KeyError:
      raise KeyError(f'tensor {key!r} is not in {self.path}') from None

  def keys(self) -> list[str]:
    """The tensor names, sorted."""
    return sorted(self._entries)

  def __iter__(self) -> Iterator[str]:
    return iter(self.keys())

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key: object) -> bool:
    return key in self._entries

  def shape(self, key: str) -> tuple[int, ...]:
    """The tensor's shape, from the header (no data read)."""
    return self._entry(key).shape

  def dtype(self, key: str) -> np.dtype:
    """The tensor's numpy dtype (BF16 -> ml_dtypes.bfloat16)."""
    return self._entry(key).dtype

  def nbytes(self, key: str) -> int:
    """The tensor's size in bytes."""
    e = self._entry(key)
    return e.end - e.begin

  def get(self, key: str) -> np.ndarray:
    """Reads one tensor, only its byte range, into a new (owned) array.

    Args:
      key: the tensor name.

    Returns:
      An array of `shape(key)` and `dtype(key)`, independent of the file.
    """
    e = self._entry(key)
    out = np.empty(e.shape, e.dtype)
    if out.nbytes:
      with self._lock:
        if self._file.closed:
          raise ValueError(f'{self.path} is closed')
        self._file.seek(self._data_start + e.begin)
        got = self._file.readinto(_bytes_view(out))
      if got != out.nbytes:
        raise SafetensorsError(
            f'{self.path}: tensor {key!r}: read {got} of {out.nbytes} bytes '
            '(the file shrank after it was opened)')
    if sys.byteorder != 'little':
      out.byteswap(inplace=True)
    return out

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> SafetensorsFile:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class ShardedCheckpoint:
  """A Hugging Face checkpoint directory: one file or index + shards.

  `model.safetensors` wins when both it and an index are present, as in
  transformers. Shards are checked to exist at construction but opened (and
  their headers parsed) only when one of their tensors is first asked for.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.fspath(directory)
    self.index_path: str | None = None
    self.index_metadata: dict = {}
    self._open_files: dict[str, SafetensorsFile] = {}
    single = os.path.join(self.directory, SINGLE_FILE)
    index = os.path.join(self.directory, INDEX_FILE)
    if os.path.isfile(single):
      self._open_files[SINGLE_FILE] = SafetensorsFile(single)
      self._weight_map = {k: SINGLE_FILE for k in self._open_files[SINGLE_FILE]}
    elif os.path.isfile(index):
      self.index_path = index
      self._weight_map = self._read_index(index)
    else:
      raise FileNotFoundError(f'{self.directory}: neither {SINGLE_FILE} nor '
                              f'{INDEX_FILE} is there')

  def _read_index(self, index: str) -> dict[str, str]:
    try:
      with open(index, encoding='utf-8') as f:
        content = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'{index}: not valid UTF-8 JSON: {e}') from e
    if not isinstance(content, dict):
      content = {}
    weight_map = content.get('weight_map')
    if not (isinstance(weight_map, dict) and all(
        isinstance(k, str) and isinstance(v, str)
        for k, v in weight_map.items())):
      raise ValueError(f'{index}: expected a JSON object whose '
                       '"weight_map" maps tensor names to shard file names')
    self.index_metadata = content.get('metadata') or {}
    for shard in sorted(set(weight_map.values())):
      # Shards are siblings of the index; a path would escape the directory.
      if os.path.basename(shard) != shard or shard in ('', '.', '..'):
        raise ValueError(f'{index}: shard {shard!r} is not a file name in '
                         'the same directory')
      if not os.path.isfile(os.path.join(self.directory, shard)):
        raise FileNotFoundError(f'{index}: shard {shard!r} listed in the '
                                f'index is missing from {self.directory}')
    return weight_map

  def _file_of(self, key: str) -> SafetensorsFile:
    try:
      shard = self._weight_map[key]
    except KeyError:
      raise KeyError(f'tensor {key!r} is not in the checkpoint at '
                     f'{self.directory}') from None
    if shard not in self._open_files:
      self._open_files[shard] = SafetensorsFile(
          os.path.join(self.directory, shard))
    f = self._open_files[shard]
    if key not in f:
      raise KeyError(f'{self.index_path}: maps tensor {key!r} to {shard}, '
                     'which does not hold it')
    return f

  def keys(self) -> list[str]:
    """All tensor names, sorted."""
    return sorted(self._weight_map)

  def __iter__(self) -> Iterator[str]:
    return iter(self.keys())

  def __len__(self) -> int:
    return len(self._weight_map)

  def __contains__(self, key: object) -> bool:
    return key in self._weight_map

  def shard_of(self, key: str) -> str:
    """The file name holding `key`."""
    self._file_of(key)
    return self._weight_map[key]

  def files(self) -> list[str]:
    """Paths of the checkpoint's safetensors files, sorted."""
    return [os.path.join(self.directory, s)
            for s in sorted(set(self._weight_map.values()))]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._file_of(key).shape(key)

  def dtype(self, key: str) -> np.dtype:
    return self._file_of(key).dtype(key)

  def get(self, key: str) -> np.ndarray:
    """Reads one tensor (see SafetensorsFile.get)."""
    return self._file_of(key).get(key)

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) one tensor at a time, shard by shard."""
    for key in sorted(self._weight_map,
                      key=lambda k: (self._weight_map[k], k)):
      yield key, self.get(key)

  def close(self) -> None:
    for f in self._open_files.values():
      f.close()
    self._open_files.clear()

  def __enter__(self) -> ShardedCheckpoint:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
  """Returns the metadata to write, with "format": "pt" guaranteed."""
  metadata = dict(metadata or {})
  if metadata.setdefault('format', 'pt') != 'pt':
    raise ValueError(f'metadata format must be "pt" (transformers refuses '
                     f'others), got {metadata["format"]!r}')
  for k, v in metadata.items():
    if not (isinstance(k, str) and isinstance(v, str)):
      raise TypeError(f'metadata must map str to str, got {k!r}: {v!r}')
  return metadata


def _as_array(key, value, where: str) -> tuple[np.ndarray, str]:
  """The array to write for `key` (native order, C-contiguous), its dtype."""
  if not isinstance(key, str):
    raise TypeError(f'{where}: tensor names must be str, got {key!r}')
  if key == METADATA_KEY:
    raise ValueError(f'{where}: {METADATA_KEY!r} is reserved for metadata')
  array = np.asarray(value)
  if not array.dtype.isnative:
    array = array.astype(array.dtype.newbyteorder('='))
  name = _NAMES.get(array.dtype)
  if name is None:
    raise ValueError(f'{where}: tensor {key!r} has dtype {array.dtype}, '
                     f'which safetensors cannot hold; expected one of '
                     f'{sorted(DTYPES)}')
  if not array.flags.c_contiguous:
    # copy rather than np.ascontiguousarray, which turns 0-d arrays 1-d.
    array = array.copy(order='C')
  return array, name


def write_safetensors(path: str | os.PathLike,
                      tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` to one safetensors file, atomically.

  Args:
    path: the file to write (replaced if it exists).
    tensors: name -> array of any dtype in DTYPES (jax arrays work too).
    metadata: extra `__metadata__` strings; "format" is "pt" (the default,
      and the only value accepted).
  """
  path = os.fspath(path)
  metadata = _check_metadata(metadata)
  arrays = {}
  for key, value in tensors.items():
    arrays[key] = _as_array(key, value, path)
  # Data in order of decreasing itemsize (as the reference writer does), so
  # every tensor starts aligned to its itemsize and readers may map it
  # without a copy; the header lists the names sorted.
  order = sorted(arrays, key=lambda k: (-arrays[k][0].itemsize, k))
  offsets, position = {}, 0
  for key in order:
    offsets[key] = (position, position + arrays[key][0].nbytes)
    position += arrays[key][0].nbytes
  header = {METADATA_KEY: metadata}
  for key in sorted(arrays):
    array, name = arrays[key]
    header[key] = {'dtype': name, 'shape': list(array.shape),
                   'data_offsets': list(offsets[key])}
  header_bytes = json.dumps(header, separators=(',', ':')).encode('utf-8')
  # Spaces, as the reference pads, so the data section starts 8-aligned.
  header_bytes += b' ' * (-len(header_bytes) % 8)

  directory, base = os.path.split(os.path.abspath(path))
  # A unique name in the same directory (so os.replace is an atomic rename),
  # created with open(): unlike mkstemp it keeps the umask's permissions.
  tmp = os.path.join(directory, f'.{base}.{secrets.token_hex(6)}.tmp')
  try:
    with open(tmp, 'xb') as f:
      f.write(len(header_bytes).to_bytes(8, 'little'))
      f.write(header_bytes)
      for key in order:
        array = arrays[key][0]
        if array.nbytes:
          f.write(_bytes_view(_to_little_endian(array)))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _shard_name(i: int, n: int) -> str:
  return f'model-{i:05d}-of-{n:05d}.safetensors'


def _checkpoint_files(directory: str) -> list[str]:
  """Files in `directory` a new checkpoint would clash with."""
  return sorted(
      name for name in os.listdir(directory)
      if name in (SINGLE_FILE, INDEX_FILE) or
      (name.startswith('model-') and name.endswith('.safetensors')))


class ShardedWriter:
  """Writes a checkpoint directory tensor by tensor, in bounded memory.

  `add` holds at most one shard's worth of tensors (references, not copies:
  do not modify an array after adding it), then writes them as a shard into
  a temporary subdirectory. `close` writes the last shard, names the shards
  `model-0000i-of-0000N.safetensors` (or `model.safetensors` when there is
  one) plus `model.safetensors.index.json`, and moves them in, index last.

  Any error (in `add`, in `close`, or in a `with` block) aborts the writer:
  its temporary files are removed and nothing partial is left behind. A
  tensor larger than `max_shard_bytes` gets a shard of its own.
  """

  def __init__(self, directory: str | os.PathLike,
               max_shard_bytes: int = 5 * 2**30,
               metadata: Mapping[str, str] | None = None):
    """Starts a checkpoint in `directory` (created if needed).

    Args:
      directory: where the checkpoint goes; it must not hold one already.
      max_shard_bytes: the most tensor bytes per shard (headers aside), as
        transformers' `max_shard_size`.
      metadata: `__metadata__` for every shard (see write_safetensors).

    Raises:
      FileExistsError: `directory` already holds checkpoint files.
    """
    if max_shard_bytes <= 0:
      raise ValueError(f'max_shard_bytes must be positive, got '
                       f'{max_shard_bytes}')
    self.directory = os.fspath(directory)
    self.max_shard_bytes = max_shard_bytes
    self._metadata = _check_metadata(metadata)
    os.makedirs(self.directory, exist_ok=True)
    clash = _checkpoint_files(self.directory)
    if clash:
      raise FileExistsError(f'{self.directory} already holds a checkpoint '
                            f'({", ".join(clash)}); use an empty directory')
    self._tmp = tempfile.mkdtemp(dir=self.directory, prefix='.shards-')
    # Removes the temporary directory if the writer is dropped unclosed.
    self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp,
                                     ignore_errors=True)
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[list[str]] = []  # keys of each written shard
    self._keys: set[str] = set()
    self._total_bytes = 0
    self._state = 'open'
    self.paths: list[str] = []

  def _check_open(self) -> None:
    if self._state != 'open':
      raise ValueError(f'ShardedWriter for {self.directory} is '
                       f'{self._state}')

  def _tmp_shard(self, i: int) -> str:
    return os.path.join(self._tmp, f'shard-{i:05d}.safetensors')

  def _flush(self) -> None:
    write_safetensors(self._tmp_shard(len(self._shards)), self._pending,
                      self._metadata)
    self._shards.append(sorted(self._pending))
    self._pending, self._pending_bytes = {}, 0

  def add(self, key: str, array: np.ndarray) -> None:
    """Queues one tensor; writes the queued shard first if it is full."""
    self._check_open()
    try:
      if key in self._keys:
        raise ValueError(f'{self.directory}: tensor {key!r} added twice')
      array, _ = _as_array(key, array, self.directory)
      if (self._pending and
          self._pending_bytes + array.nbytes > self.max_shard_bytes):
        self._flush()
      self._pending[key] = array
      self._pending_bytes += array.nbytes
      self._keys.add(key)
      self._total_bytes += array.nbytes
    except BaseException:
      self.abort()
      raise

  def close(self) -> list[str]:
    """Writes the last shard and the index; returns the paths written."""
    if self._state == 'closed':
      return self.paths
    self._check_open()
    try:
      if self._pending or not self._shards:
        self._flush()
      n = len(self._shards)
      moves = [(self._tmp_shard(i),
                SINGLE_FILE if n == 1 else _shard_name(i + 1, n))
               for i in range(n)]
      if n > 1:
        weight_map = {key: moves[i][1]
                      for i, keys in enumerate(self._shards) for key in keys}
        index = {'metadata': {'total_size': self._total_bytes},
                 'weight_map': dict(sorted(weight_map.items()))}
        tmp_index = os.path.join(self._tmp, INDEX_FILE)
        with open(tmp_index, 'w', encoding='utf-8') as f:
          json.dump(index, f, indent=2)
          f.write('\n')
        # Last, so a reader never sees an index before its shards.
        moves.append((tmp_index, INDEX_FILE))
      clash = _checkpoint_files(self.directory)
      if clash:
        raise FileExistsError(f'{self.directory}: {", ".join(clash)} '
                              'appeared while the checkpoint was written')
      moved = []
      try:
        for src, name in moves:
          dst = os.path.join(self.directory, name)
          os.replace(src, dst)
          moved.append(dst)
      except BaseException:
        for dst in moved:
          os.unlink(dst)
        raise
    except BaseException:
      self.abort()
      raise
    self._cleanup()
    self._state = 'closed'
    self.paths = moved
    return moved

  def abort(self) -> None:
    """Drops everything written so far; the writer cannot be used again."""
    self._pending, self._pending_bytes = {}, 0
    self._cleanup()
    if self._state == 'open':
      self._state = 'aborted'

  def __enter__(self) -> ShardedWriter:
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()
