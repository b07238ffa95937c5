"""moe_jax.convert.safetensors_io against the `safetensors` package as oracle.

Files written by safetensors (numpy and torch front ends) must read back
bit-exact, files we write must load bit-exact there, and every malformed
input must fail with a message naming the file and the tensor.
"""

import json
import os
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from moe_jax.convert import safetensors_io as sio

ALL_DTYPES = sorted(sio.DTYPES)
# Shapes covering a matrix, an odd length, a scalar and a zero-size tensor.
SHAPES = {'w': (3, 5), 'odd': (7,), 'scalar': (), 'empty': (0, 4)}


def random_array(name: str, shape, rng) -> np.ndarray:
  """Random bit patterns of a safetensors dtype (NaN payloads included)."""
  dtype = sio.DTYPES[name]
  if dtype == np.bool_:
    return rng.integers(0, 2, shape).astype(np.bool_)
  size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  return rng.integers(0, 256, size, dtype=np.uint8).view(dtype).reshape(shape)


def random_tensors(dtype_name: str, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tensors = {k: random_array(dtype_name, s, rng) for k, s in SHAPES.items()}
  # A second dtype in the same file, so offsets mix itemsizes.
  tensors['other_f32'] = random_array('F32', (2, 3), rng)
  return tensors


def assert_bit_equal(actual: np.ndarray, expected: np.ndarray) -> None:
  assert actual.dtype == expected.dtype
  assert actual.shape == expected.shape
  assert actual.tobytes() == expected.tobytes()


def header_of(path) -> dict:
  with open(path, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    return json.loads(f.read(n))


def hand_written(path, header: dict, data: bytes = b'') -> str:
  """A safetensors file with a header written by hand (no validation)."""
  raw = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(len(raw).to_bytes(8, 'little') + raw + data)
  return str(path)


# Reading files written by the reference implementation.


@pytest.mark.parametrize('dtype_name', ALL_DTYPES)
def test_reads_files_written_by_safetensors_numpy(tmp_path, dtype_name):
  tensors = random_tensors(dtype_name)
  path = tmp_path / 'ref.safetensors'
  safetensors.numpy.save_file(tensors, str(path),
                              metadata={'format': 'np', 'note': 'x'})
  with sio.SafetensorsFile(path) as f:
    assert f.keys() == sorted(tensors)
    assert f.metadata == {'format': 'np', 'note': 'x'}
    for key, expected in tensors.items():
      assert f.shape(key) == expected.shape
      assert f.dtype(key) == expected.dtype
      assert_bit_equal(f.get(key), expected)


def test_reads_bfloat16_written_by_safetensors_torch(tmp_path):
  torch = pytest.importorskip('torch')
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(0)
  tensors = {'w': torch.randn(4, 6, generator=gen).to(torch.bfloat16),
             'b': torch.randn(6, generator=gen).to(torch.bfloat16),
             'scalar': torch.tensor(1.5, dtype=torch.bfloat16)}
  path = tmp_path / 'torch.safetensors'
  safetensors.torch.save_file(tensors, str(path), metadata={'format': 'pt'})
  with sio.SafetensorsFile(path) as f:
    assert f.metadata == {'format': 'pt'}
    for key, t in tensors.items():
      got = f.get(key)
      assert got.dtype == ml_dtypes.bfloat16
      assert got.shape == tuple(t.shape)
      np.testing.assert_array_equal(got.view(np.int16),
                                    t.view(torch.int16).numpy())


# Files we write, read by the reference implementation.


# safetensors.numpy 0.8 cannot load float8 (it looks for np.float8_e4m3fn),
# so float8 goes through the torch front end, as bfloat16 also does.
TORCH_ONLY = ('F8_E4M3', 'F8_E5M2')


@pytest.mark.parametrize(
    'dtype_name', [d for d in ALL_DTYPES if d not in TORCH_ONLY])
def test_written_files_load_with_safetensors_numpy(tmp_path, dtype_name):
  tensors = random_tensors(dtype_name, seed=1)
  path = tmp_path / 'ours.safetensors'
  sio.write_safetensors(path, tensors)
  loaded = safetensors.numpy.load_file(str(path))
  assert sorted(loaded) == sorted(tensors)
  for key, expected in tensors.items():
    assert_bit_equal(loaded[key], expected)
  with safetensors.safe_open(str(path), 'np') as f:
    assert f.metadata() == {'format': 'pt'}
  assert os.listdir(tmp_path) == ['ours.safetensors']


@pytest.mark.parametrize('dtype_name', ('BF16',) + TORCH_ONLY)
def test_written_files_load_with_safetensors_torch(tmp_path, dtype_name):
  torch = pytest.importorskip('torch')
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  torch_dtypes = {sio.DTYPES['BF16']: torch.bfloat16,
                  sio.DTYPES['F8_E4M3']: torch.float8_e4m3fn,
                  sio.DTYPES['F8_E5M2']: torch.float8_e5m2,
                  sio.DTYPES['F32']: torch.float32}
  tensors = random_tensors(dtype_name, seed=2)
  path = tmp_path / 'ours.safetensors'
  sio.write_safetensors(path, tensors)
  loaded = safetensors.torch.load_file(str(path))
  assert sorted(loaded) == sorted(tensors)
  for key, expected in tensors.items():
    t = loaded[key]
    assert t.dtype == torch_dtypes[expected.dtype]
    assert tuple(t.shape) == expected.shape
    bits = t.reshape(-1).view(torch.uint8).numpy()
    assert bits.tobytes() == expected.tobytes()
  with safetensors.safe_open(str(path), 'pt') as f:
    assert f.metadata() == {'format': 'pt'}


def test_header_layout(tmp_path):
  rng = np.random.default_rng(3)
  tensors = {'b_u8': random_array('U8', (3,), rng),
             'a_f64': random_array('F64', (2,), rng),
             'c_bf16': random_array('BF16', (5,), rng)}
  path = tmp_path / 'layout.safetensors'
  sio.write_safetensors(path, tensors, metadata={'source': 'test'})
  raw = path.read_bytes()
  n = int.from_bytes(raw[:8], 'little')
  assert n % 8 == 0
  text = raw[8:8 + n].decode()
  assert text == text.rstrip() + ' ' * (len(text) - len(text.rstrip()))
  header = json.loads(text)
  assert list(header) == ['__metadata__', 'a_f64', 'b_u8', 'c_bf16']
  assert header['__metadata__'] == {'format': 'pt', 'source': 'test'}
  for key, entry in header.items():
    if key != '__metadata__':
      # Each tensor starts aligned to its itemsize (larger itemsizes first).
      assert entry['data_offsets'][0] % tensors[key].itemsize == 0


def test_metadata_format_other_than_pt_is_refused(tmp_path):
  with pytest.raises(ValueError, match='format'):
    sio.write_safetensors(tmp_path / 'x.safetensors',
                          {'a': np.zeros(2, np.float32)},
                          metadata={'format': 'np'})
  assert not os.listdir(tmp_path)


def test_non_native_byte_order_and_strided_inputs(tmp_path):
  values = np.arange(12, dtype=np.float32).reshape(3, 4)
  tensors = {'big_endian': values.astype('>f4'), 'strided': values.T}
  path = tmp_path / 'x.safetensors'
  sio.write_safetensors(path, tensors)
  loaded = safetensors.numpy.load_file(str(path))
  np.testing.assert_array_equal(loaded['big_endian'], values)
  np.testing.assert_array_equal(loaded['strided'], values.T)


def test_scalar_and_zero_size_round_trip(tmp_path):
  tensors = {'scalar': np.array(3.5, np.float32),
             'empty': np.zeros((0, 3), ml_dtypes.bfloat16),
             'empty_1d': np.zeros((0,), np.int64),
             'scalar_bool': np.array(True)}
  path = tmp_path / 'edge.safetensors'
  sio.write_safetensors(path, tensors)
  loaded = safetensors.numpy.load_file(str(path))
  with sio.SafetensorsFile(path) as f:
    for key, expected in tensors.items():
      assert_bit_equal(loaded[key], expected)
      assert_bit_equal(f.get(key), expected)


def test_empty_file_round_trip(tmp_path):
  path = tmp_path / 'none.safetensors'
  sio.write_safetensors(path, {})
  assert safetensors.numpy.load_file(str(path)) == {}
  with sio.SafetensorsFile(path) as f:
    assert f.keys() == [] and f.metadata == {'format': 'pt'}


# Sharded checkpoints.


def shard_tensors() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(4)
  tensors = {f'layers.{i}.w': random_array('F32', (10, 10), rng)
             for i in range(5)}  # 400 bytes each
  tensors['embed'] = random_array('BF16', (30, 10), rng)  # 600 bytes
  tensors['scalar'] = random_array('I64', (), rng)
  return tensors


def test_sharded_round_trip(tmp_path):
  tensors = shard_tensors()
  out = tmp_path / 'ckpt'
  with sio.ShardedWriter(out, max_shard_bytes=1000) as writer:
    for key, value in tensors.items():
      writer.add(key, value)
  n = len(writer.paths) - 1
  assert n >= 3
  names = [f'model-{i:05d}-of-{n:05d}.safetensors' for i in range(1, n + 1)]
  # Nothing else (the temporary subdirectory is gone).
  assert sorted(os.listdir(out)) == sorted(names + [sio.INDEX_FILE])

  index = json.loads((out / sio.INDEX_FILE).read_text())
  assert index['metadata'] == {
      'total_size': sum(t.nbytes for t in tensors.values())}
  assert sorted(index['weight_map']) == sorted(tensors)
  assert set(index['weight_map'].values()) == set(names)

  from_reference = {}
  for name in names:
    shard = safetensors.numpy.load_file(str(out / name))
    assert sum(t.nbytes for t in shard.values()) <= 1000
    assert all(index['weight_map'][k] == name for k in shard)
    with safetensors.safe_open(str(out / name), 'np') as f:
      assert f.metadata() == {'format': 'pt'}
    from_reference.update(shard)
  with sio.ShardedCheckpoint(out) as ckpt:
    assert ckpt.keys() == sorted(tensors) and len(ckpt) == len(tensors)
    assert ckpt.files() == [str(out / name) for name in names]
    assert 'embed' in ckpt and 'nope' not in ckpt
    for key, expected in tensors.items():
      assert ckpt.shape(key) == expected.shape
      assert ckpt.dtype(key) == expected.dtype
      assert_bit_equal(ckpt.get(key), expected)
      assert_bit_equal(from_reference[key], expected)
    assert {k: v.tobytes() for k, v in ckpt.items()} == {
        k: v.tobytes() for k, v in tensors.items()}


def test_single_shard_is_model_safetensors(tmp_path):
  tensors = shard_tensors()
  with sio.ShardedWriter(tmp_path, max_shard_bytes=10**6) as writer:
    for key, value in tensors.items():
      writer.add(key, value)
  assert os.listdir(tmp_path) == [sio.SINGLE_FILE]
  loaded = safetensors.numpy.load_file(str(tmp_path / sio.SINGLE_FILE))
  with sio.ShardedCheckpoint(tmp_path) as ckpt:
    assert ckpt.files() == [str(tmp_path / sio.SINGLE_FILE)]
    for key, expected in tensors.items():
      assert_bit_equal(ckpt.get(key), expected)
      assert_bit_equal(loaded[key], expected)


def test_tensor_larger_than_a_shard_gets_its_own(tmp_path):
  writer = sio.ShardedWriter(tmp_path, max_shard_bytes=100)
  writer.add('small', np.zeros(4, np.float32))
  writer.add('big', np.ones(100, np.float32))
  writer.add('tail', np.zeros(4, np.float32))
  writer.close()
  index = json.loads((tmp_path / sio.INDEX_FILE).read_text())
  shards = index['weight_map']
  assert len(set(shards.values())) == 3
  assert len({shards['small'], shards['big'], shards['tail']}) == 3


def test_writer_refuses_a_directory_holding_a_checkpoint(tmp_path):
  sio.write_safetensors(tmp_path / sio.SINGLE_FILE, {'a': np.zeros(1)})
  with pytest.raises(FileExistsError, match=sio.SINGLE_FILE):
    sio.ShardedWriter(tmp_path)


# Nothing partial on errors.


def test_write_error_leaves_nothing(tmp_path, monkeypatch):
  path = tmp_path / 'x.safetensors'
  with pytest.raises(ValueError, match="'c'.*complex64"):
    sio.write_safetensors(path, {'a': np.zeros(2, np.float32),
                                 'c': np.zeros(2, np.complex64)})
  assert not os.listdir(tmp_path)

  sio.write_safetensors(path, {'a': np.zeros(2, np.float32)})
  before = path.read_bytes()

  def fail(fd):
    raise OSError('disk full')

  monkeypatch.setattr(sio.os, 'fsync', fail)
  with pytest.raises(OSError, match='disk full'):
    sio.write_safetensors(path, {'a': np.ones(2, np.float32)})
  assert os.listdir(tmp_path) == ['x.safetensors']
  assert path.read_bytes() == before


def test_sharded_writer_error_leaves_nothing(tmp_path):
  writer = sio.ShardedWriter(tmp_path, max_shard_bytes=16)
  for i in range(4):
    writer.add(f'w{i}', np.zeros(4, np.float32))  # a shard each
  with pytest.raises(ValueError, match="'bad'"):
    writer.add('bad', np.zeros(2, np.complex64))
  assert not os.listdir(tmp_path)
  with pytest.raises(ValueError, match='aborted'):
    writer.add('w9', np.zeros(4, np.float32))

  with pytest.raises(RuntimeError, match='caller'):
    with sio.ShardedWriter(tmp_path, max_shard_bytes=16) as writer:
      for i in range(4):
        writer.add(f'w{i}', np.zeros(4, np.float32))
      raise RuntimeError('caller failed')
  assert not os.listdir(tmp_path)

  writer = sio.ShardedWriter(tmp_path, max_shard_bytes=16)
  writer.add('w0', np.zeros(4, np.float32))
  with pytest.raises(ValueError, match="'w0' added twice"):
    writer.add('w0', np.zeros(4, np.float32))
  assert not os.listdir(tmp_path)


# Malformed files: every message names the file (and the tensor).


def test_truncated_file(tmp_path):
  path = tmp_path / 'x.safetensors'
  sio.write_safetensors(path, {'a': np.zeros(8, np.float32)})
  size = path.stat().st_size
  os.truncate(path, size - 3)
  with pytest.raises(sio.SafetensorsError) as e:
    sio.SafetensorsFile(path)
  message = str(e.value)
  assert str(path) in message and 'truncated' in message
  assert str(size) in message and str(size - 3) in message

  os.truncate(path, 5)
  with pytest.raises(sio.SafetensorsError, match='truncated'):
    sio.SafetensorsFile(path)


def test_header_length_past_the_end(tmp_path):
  path = tmp_path / 'x.safetensors'
  path.write_bytes((1000).to_bytes(8, 'little') + b'{}')
  with pytest.raises(sio.SafetensorsError,
                     match='header length 1000 runs past the end') as e:
    sio.SafetensorsFile(path)
  assert str(path) in str(e.value)


def test_bad_json(tmp_path):
  path = tmp_path / 'x.safetensors'
  path.write_bytes((4).to_bytes(8, 'little') + b'{"a"')
  with pytest.raises(sio.SafetensorsError, match='JSON') as e:
    sio.SafetensorsFile(path)
  assert str(path) in str(e.value)


def test_unknown_dtype(tmp_path):
  path = hand_written(tmp_path / 'x.safetensors', {
      'weird': {'dtype': 'F4', 'shape': [2], 'data_offsets': [0, 1]}}, b'x')
  with pytest.raises(sio.SafetensorsError) as e:
    sio.SafetensorsFile(path)
  message = str(e.value)
  assert path in message and "'weird'" in message and "'F4'" in message
  assert 'BF16' in message  # says what it expected


def test_offsets_not_matching_shape(tmp_path):
  path = hand_written(tmp_path / 'x.safetensors', {
      'a': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [0, 20]}},
                      bytes(20))
  with pytest.raises(sio.SafetensorsError,
                     match=r"'a'.*span 20 bytes, expected 24") as e:
    sio.SafetensorsFile(path)
  assert path in str(e.value)


def test_overlapping_offsets(tmp_path):
  path = hand_written(tmp_path / 'x.safetensors', {
      'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},
      'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}},
                      bytes(12))
  with pytest.raises(sio.SafetensorsError, match="'b'.*overlaps.*'a'"):
    sio.SafetensorsFile(path)


def test_trailing_bytes(tmp_path):
  path = hand_written(tmp_path / 'x.safetensors', {
      'a': {'dtype': 'U8', 'shape': [2], 'data_offsets': [0, 2]}}, bytes(5))
  with pytest.raises(sio.SafetensorsError, match='3 bytes past the last'):
    sio.SafetensorsFile(path)


def test_unknown_key(tmp_path):
  path = tmp_path / sio.SINGLE_FILE
  sio.write_safetensors(path, {'a': np.zeros(2, np.float32)})
  with sio.SafetensorsFile(path) as f:
    with pytest.raises(KeyError, match="'nope'") as e:
      f.get('nope')
    assert str(path) in str(e.value)
  with sio.ShardedCheckpoint(tmp_path) as ckpt:
    with pytest.raises(KeyError, match="'nope'") as e:
      ckpt.get('nope')
    assert str(tmp_path) in str(e.value)


def write_three_shards(directory) -> dict[str, str]:
  with sio.ShardedWriter(directory, max_shard_bytes=16) as writer:
    for i in range(3):
      writer.add(f'w{i}', np.full(4, i, np.float32))
  index = json.loads((directory / sio.INDEX_FILE).read_text())
  return index['weight_map']


def test_missing_shard(tmp_path):
  weight_map = write_three_shards(tmp_path)
  os.remove(tmp_path / weight_map['w1'])
  with pytest.raises(FileNotFoundError) as e:
    sio.ShardedCheckpoint(tmp_path)
  message = str(e.value)
  assert weight_map['w1'] in message
  assert str(tmp_path / sio.INDEX_FILE) in message


def test_no_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match=sio.INDEX_FILE):
    sio.ShardedCheckpoint(tmp_path)


def test_shards_open_lazily(tmp_path):
  weight_map = write_three_shards(tmp_path)
  bad = tmp_path / weight_map['w2']
  os.truncate(bad, bad.stat().st_size - 1)
  with sio.ShardedCheckpoint(tmp_path) as ckpt:
    np.testing.assert_array_equal(ckpt.get('w0'), np.zeros(4, np.float32))
    with pytest.raises(sio.SafetensorsError, match='truncated') as e:
      ckpt.get('w2')
    assert str(bad) in str(e.value)


def test_get_reads_only_its_tensor(tmp_path):
  """A 256 MiB tensor is never read when a 16-byte one is asked for."""
  big = 2**26  # float32 elements
  header = json.dumps({
      'small': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]},
      'big': {'dtype': 'F32', 'shape': [big], 'data_offsets': [16,
                                                               16 + 4 * big]},
  }).encode()
  header += b' ' * (-len(header) % 8)
  small = np.arange(4, dtype=np.float32)
  path = tmp_path / 'sparse.safetensors'
  with open(path, 'wb') as f:
    f.write(len(header).to_bytes(8, 'little') + header + small.tobytes())
    # Extend without writing: a sparse file, so this costs no disk.
    f.truncate(8 + len(header) + 16 + 4 * big)
  with sio.SafetensorsFile(path) as f:
    assert f.shape('big') == (big,)
    tracemalloc.start()
    try:
      got = f.get('small')
      _, peak = tracemalloc.get_traced_memory()
    finally:
      tracemalloc.stop()
  np.testing.assert_array_equal(got, small)
  assert peak < 2**20
