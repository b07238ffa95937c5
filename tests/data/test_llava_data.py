"""LLaVA data pipeline: batches, length grouping, resume, bad input; the
tiny shapes set."""

import filecmp
import json
import logging
import os

import numpy as np
from PIL import Image
import pytest

from moe_jax.data import conversation
from moe_jax.data import images
from moe_jax.data import llava
from moe_jax.data import tiny_vlm
from moe_jax.data import tokenizer as tokenizer_lib
from tests.data import test_conversation as conv_cases

IMAGE_ID = conv_cases.IMAGE_ID
N_IMG = 4
SPEC = images.ImageSpec(size=16)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
  return tiny_vlm.write_shapes_dataset(
      tmp_path_factory.mktemp('shapes') / 'set', num_train=24, num_eval=8,
      image_size=16)


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return tokenizer_lib.HFTokenizer(
      conv_cases.write_word_tokenizer(tmp_path_factory.mktemp('tok')))


def build(json_path, image_dir, tok, **kw):
  args = dict(template='phi35', seq_len=64, global_batch_size=4,
              image_token_id=IMAGE_ID, num_image_tokens=N_IMG, seed=0,
              process_index=0, process_count=1, num_threads=0, prefetch=0)
  args.update(kw)
  return llava.build_llava_pipeline(json_path, image_dir, tok, SPEC, **args)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batch_fields_match_the_samples(shapes, tok):
  p = build(shapes.sft_json, shapes.image_dir, tok,
            valid_json=shapes.sft_valid_json)
  samples = {s.id: s for s in llava.read_llava_json(shapes.sft_json)}
  pixels = {sid: images.load_image(os.path.join(shapes.image_dir, s.image),
                                   SPEC) for sid, s in samples.items()}
  seen = []
  for batch in take(p.train_iterator(), 2) + list(p.valid_iterator())[:1]:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        'inputs': ((4, 64), np.int32), 'targets': ((4, 64), np.int32),
        'loss_mask': ((4, 64), np.float32),
        'attention_mask': ((4, 64), np.int32),
        'images': ((4, 16, 16, 3), np.float32)}
    for row in range(4):
      # Which sample: the one whose image this row holds.
      matches = [sid for sid, x in pixels.items()
                 if np.array_equal(x, batch['images'][row])]
      if not matches:   # a validation sample
        continue
      sid = matches[0]
      seen.append(sid)
      ids, mask = conversation.encode_conversation(
          samples[sid].conversations, tok, 'phi35', image_token_id=IMAGE_ID,
          num_image_tokens=N_IMG)
      n = len(ids)
      tokens = np.zeros([65], np.int32)
      tokens[:n] = ids
      full_mask = np.zeros([65], np.float32)
      full_mask[:n] = mask
      np.testing.assert_array_equal(batch['inputs'][row], tokens[:-1])
      # Targets without loss are 0.
      np.testing.assert_array_equal(batch['targets'][row],
                                    np.where(full_mask[1:] > 0, tokens[1:], 0))
      np.testing.assert_array_equal(batch['loss_mask'][row], full_mask[1:])
      np.testing.assert_array_equal(batch['attention_mask'][row],
                                    np.arange(64) < n)
      # Loss only where the target is an answer token.
      answers = {t['value'] for t in samples[sid].conversations
                 if t['from'] == 'gpt'}
      target_words = {tok.id_to_piece(int(i)) for i in
                      batch['targets'][row][batch['loss_mask'][row] > 0]}
      assert target_words == answers | {'<|end|>', '\n'}
  assert len(seen) == 8 and len(set(seen)) == 8
  assert p.summary()['num_valid_batches'] == 2


def test_text_only_samples_get_zero_images(tmp_path, tok):
  data = [{'id': f't{i}', 'conversations': [
      {'from': 'human', 'value': 'What is it?'},
      {'from': 'gpt', 'value': 'a red circle'}]} for i in range(4)]
  path = tmp_path / 'text.json'
  path.write_text(json.dumps(data))
  batch = next(build(str(path), str(tmp_path), tok).train_iterator())
  assert not batch['images'].any() and batch['loss_mask'].sum() == 4 * 7


def _varied_json(tmp_path, n=32):
  """Text-only samples whose answers have 1..n words: varied lengths."""
  data = [{'id': f'v{i}', 'conversations': [
      {'from': 'human', 'value': 'What is it?'},
      {'from': 'gpt', 'value': ' '.join(['red'] * (1 + (i * 7) % n))}]}
          for i in range(n)]
  path = tmp_path / 'varied.json'
  path.write_text(json.dumps(data))
  return str(path)


def test_length_grouped_order_properties():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 100, size=50)
  order = llava.length_grouped_order(lengths, global_batch=4, seed=3, epoch=0,
                                     megabatch_factor=2)
  # 12 whole global batches of distinct samples.
  assert len(order) == 48 and len(set(order.tolist())) == 48
  batches = lengths[order].reshape(12, 4)
  assert (np.diff(batches, axis=1) <= 0).all()   # longest first
  again = llava.length_grouped_order(lengths, global_batch=4, seed=3,
                                     epoch=0, megabatch_factor=2)
  np.testing.assert_array_equal(order, again)
  for other in (dict(seed=4, epoch=0), dict(seed=3, epoch=1)):
    assert not np.array_equal(order, llava.length_grouped_order(
        lengths, global_batch=4, megabatch_factor=2, **other))
  # One megabatch holding everything: batches are slices of the sorted
  # lengths (no overlap between batches).
  whole = llava.length_grouped_order(lengths[:48], global_batch=4, seed=3,
                                     epoch=0, megabatch_factor=12)
  grouped = lengths[:48][whole].reshape(12, 4)
  grouped = grouped[np.argsort(-grouped[:, 0], kind='stable')]
  assert (grouped[:-1, -1] >= grouped[1:, 0]).all()


def test_default_grouping_keeps_the_plain_shuffle_batches():
  """LLaVA's megabatch is one global batch: grouping changes no step's
  samples, only their order within the step (longest first)."""
  lengths = np.random.default_rng(0).integers(1, 100, size=50)
  order = llava.length_grouped_order(lengths, global_batch=4, seed=3,
                                     epoch=1)
  perm = np.random.default_rng([3, 1]).permutation(50)[:48]
  assert ({frozenset(b) for b in order.reshape(12, 4).tolist()} ==
          {frozenset(b) for b in perm.reshape(12, 4).tolist()})
  assert (np.diff(lengths[order].reshape(12, 4), axis=1) <= 0).all()


def test_pipeline_batches_are_length_grouped(tmp_path, tok):
  p = build(_varied_json(tmp_path), str(tmp_path), tok, megabatch_factor=2,
            seq_len=128)
  lengths = np.stack([b['attention_mask'].sum(1)
                      for b in take(p.train_iterator(), 8)])   # [8, 4]
  assert (np.diff(lengths, axis=1) <= 0).all()
  assert len(set(lengths[:, 0].tolist())) > 1


def test_process_slices_make_the_global_batch(shapes, tok):
  whole = take(build(shapes.sft_json, shapes.image_dir, tok)
               .train_iterator(), 3)
  parts = [take(build(shapes.sft_json, shapes.image_dir, tok,
                      process_index=p, process_count=2).train_iterator(), 3)
           for p in range(2)]
  for b in range(3):
    for key in whole[b]:
      np.testing.assert_array_equal(
          whole[b][key], np.concatenate([parts[0][b][key],
                                         parts[1][b][key]]))


def test_exact_resume_across_an_epoch(shapes, tok):
  p = build(shapes.sft_json, shapes.image_dir, tok)
  it = p.train_iterator()
  take(it, 5)                      # 6 batches per epoch (24 / 4)
  state = it.get_state()
  expected = take(it, 3)
  resumed = take(p.train_iterator(json.loads(json.dumps(state))), 3)
  for a, b in zip(expected, resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Epochs are reshuffled: epoch 1 is not epoch 0 again.
  first = [b['inputs'] for b in take(p.train_iterator(), 12)]
  assert any(not np.array_equal(first[i], first[i + 6]) for i in range(6))


def _one_sample_json(tmp_path, sample, name='one.json', copies=4):
  data = [dict(sample, id=f'{sample["id"]}-{k}' if k else sample['id'])
          for k in range(copies)]
  path = tmp_path / name
  path.write_text(json.dumps(data))
  return str(path)


CAPTION = [{'from': 'human', 'value': '<image>\nWhat is it?'},
           {'from': 'gpt', 'value': 'a red circle'}]


def test_missing_image_names_sample_and_path(tmp_path, tok):
  path = _one_sample_json(tmp_path, {'id': 'm1', 'image': 'gone.png',
                                     'conversations': CAPTION})
  with pytest.raises(FileNotFoundError, match="sample 'm1'.*gone.png"):
    build(path, str(tmp_path), tok)
  # Unchecked at build: the read fails with the same error.
  p = build(path, str(tmp_path), tok, check_images=False)
  with pytest.raises(FileNotFoundError, match="sample 'm1.*gone.png"):
    next(p.train_iterator())


def test_bad_image_mode_fails_at_build_naming_sample_file_and_mode(
    tmp_path, tok):
  Image.new('I;16', (8, 8)).save(tmp_path / 'deep.png')
  path = _one_sample_json(tmp_path, {'id': 'd1', 'image': 'deep.png',
                                     'conversations': CAPTION})
  with pytest.raises(ValueError, match=r"one.json: sample 'd1' \(entry 0\): "
                     r"image .*deep.png.*'I;16'"):
    build(path, str(tmp_path), tok)
  # Unchecked at build: the read fails with the same error (for whichever
  # copy of the sample the batch starts with).
  p = build(path, str(tmp_path), tok, check_images=False)
  with pytest.raises(ValueError, match=r"one.json: sample 'd1.* \(entry \d\): "
                     r"image .*deep.png.*'I;16'"):
    next(p.train_iterator())


def test_colour_space_images_are_accepted(tmp_path, tok):
  rgb = np.random.default_rng(2).integers(0, 256, (12, 10, 3), np.uint8)
  Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'print.jpg')
  path = _one_sample_json(tmp_path, {'id': 'c1', 'image': 'print.jpg',
                                     'conversations': CAPTION})
  batch = next(build(path, str(tmp_path), tok).train_iterator())
  with Image.open(tmp_path / 'print.jpg') as image:
    assert image.mode == 'CMYK'
    expected = images.preprocess(image.convert('RGB'), SPEC)
  for row in batch['images']:
    np.testing.assert_array_equal(row, expected)


def test_targets_without_loss_are_valid_ids(shapes, tok):
  """An image id outside the vocabulary (init_vlm's len(tokenizer) when the
  LLM has no `<image>` token) never reaches the targets: cross-entropy's
  gather would give NaN there, and NaN * 0 is NaN."""
  image_id = tok.vocab_size + 5
  p = build(shapes.sft_json, shapes.image_dir, tok, image_token_id=image_id,
            valid_json=shapes.sft_valid_json)
  for batch in take(p.train_iterator(), 3) + list(p.valid_iterator()):
    assert (batch['inputs'] == image_id).sum() == 4 * N_IMG
    targets, loss = batch['targets'], batch['loss_mask']
    assert (targets[loss == 0] == 0).all()
    assert ((targets >= 0) & (targets < tok.vocab_size)).all()
    assert loss.sum() > 0


def test_repeated_ids_are_read_and_errors_name_the_entry(tmp_path, tok):
  """LLaVA-Instruct reuses a COCO image's id for its conversations."""
  good = {'id': '000000033471', 'image': 'a.png', 'conversations': CAPTION}
  path = tmp_path / 'instruct.json'
  path.write_text(json.dumps([good, good]))
  assert [(s.id, s.index) for s in llava.read_llava_json(path)] == [
      ('000000033471', 0), ('000000033471', 1)]
  bad = dict(good, conversations=[{'from': 'bot', 'value': 'hi'}])
  path.write_text(json.dumps([good, bad]))
  with pytest.raises(ValueError, match=r"instruct.json: sample "
                     r"'000000033471' \(entry 1\): conversations\[0\]"):
    llava.read_llava_json(path)


@pytest.mark.parametrize('sample, message', [
    ({'id': 'x1', 'image': 'a.png', 'conversations': [
        {'from': 'human', 'value': '<image> <image>'},
        {'from': 'gpt', 'value': 'y'}]},
     r"sample 'x1' \(entry 0\): 2 <image> tags but 1"),
    ({'id': 'x2', 'conversations': CAPTION},
     r"sample 'x2' \(entry 0\): 1 <image> tag.*no \"image\" field"),
    ({'id': 'x3', 'image': ['a.png', 'b.png'], 'conversations': CAPTION},
     r"sample 'x3' \(entry 0\): 2 images"),
    ({'id': 'x4', 'image': 'a.png', 'conversations': [
        {'from': 'human', 'value': 'hi'}, {'from': 'gpt', 'value': 'y'}]},
     r"sample 'x4' \(entry 0\): has an image .* but no <image> tag"),
    ({'id': 'x5', 'conversations': [{'from': 'bot', 'value': 'hi'}]},
     r"sample 'x5' \(entry 0\): conversations\[0\].from='bot': unknown "
     'role'),
    ({'id': 'x6'}, r"sample 'x6' \(entry 0\): missing field "
     '"conversations"'),
    ({'conversations': CAPTION}, 'entry 0: missing field "id"'),
    ({'id': 'x8', 'conversations': [{'from': 'human'}]},
     r"sample 'x8' \(entry 0\): conversations\[0\]: missing field "
     r'\"value\"'),
])
def test_bad_samples_name_file_and_sample(tmp_path, sample, message):
  path = tmp_path / 'bad.json'
  path.write_text(json.dumps([sample]))
  with pytest.raises(ValueError, match=message) as e:
    llava.read_llava_json(path)
  assert str(path) in str(e.value)


def test_bad_turn_order_names_sample(tmp_path, tok):
  path = _one_sample_json(tmp_path, {'id': 'o1', 'conversations': [
      {'from': 'gpt', 'value': 'a'}, {'from': 'human', 'value': 'b'}]})
  with pytest.raises(ValueError, match=r"sample 'o1'.*conversations\[0\]"):
    build(path, str(tmp_path), tok)


def test_over_long_samples_error_or_counted_skip(shapes, tok, caplog):
  # phi35 shapes samples are 56 tokens (N_IMG = 4); seq_len 50 fits none,
  # so mix in short text-only samples.
  samples = json.load(open(shapes.sft_json))[:6]
  short = [{'id': f's{i}', 'conversations': [
      {'from': 'human', 'value': 'hi'}, {'from': 'gpt', 'value': 'red'}]}
           for i in range(4)]
  path = os.path.join(shapes.root, '..', 'mixed.json')
  with open(path, 'w') as f:
    json.dump(samples + short, f)
  with pytest.raises(ValueError, match=r"sample 'train-00000' \(entry 0\): "
                     r"56 tokens.*seq_len \+ 1 = 51.*too_long"):
    build(path, shapes.image_dir, tok, seq_len=50)
  with caplog.at_level(logging.WARNING):
    p = build(path, shapes.image_dir, tok, seq_len=50, too_long='skip')
  summary = p.summary()
  assert summary['num_skipped_too_long'] == {'train': 6}
  assert summary['skipped_ids']['train'] == [
      f'train-{i:05d}' for i in range(5)]
  assert summary['num_train_samples'] == 4
  assert 'skipped 6 of 10' in caplog.text and 'train-00000' in caplog.text
  batch = next(p.train_iterator())
  assert not batch['images'].any()


def test_shapes_set_is_deterministic_idempotent_and_checked(tmp_path):
  kw = dict(num_train=12, num_eval=4, image_size=12, seed=5)
  a = tiny_vlm.write_shapes_dataset(tmp_path / 'a', **kw)
  b = tiny_vlm.write_shapes_dataset(tmp_path / 'b', **kw)
  names = sorted(os.listdir(os.path.join(a.root, 'images')))
  assert len(names) == 16
  for name in ('pretrain.json', 'sft.json', 'eval.jsonl',
               *(f'images/{n}' for n in names)):
    assert filecmp.cmp(os.path.join(a.root, name), os.path.join(b.root, name),
                       shallow=False)
  stamp = os.path.getmtime(a.pretrain_json)
  assert tiny_vlm.write_shapes_dataset(tmp_path / 'a', **kw) == a
  assert os.path.getmtime(a.pretrain_json) == stamp
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.shapes')]
  with pytest.raises(ValueError, match='written with'):
    tiny_vlm.write_shapes_dataset(tmp_path / 'a', **dict(kw, seed=6))
  # The files: LLaVA format that read_llava_json accepts, captions that
  # name what is drawn, answerable multiple-choice items.
  pretrain = llava.read_llava_json(a.pretrain_json)
  sft = llava.read_llava_json(a.sft_json)
  assert len(pretrain) == len(sft) == 12
  assert len(llava.read_llava_json(a.sft_valid_json)) == 4
  colour, shape = pretrain[0].conversations[1]['value'].split()[1:]
  pixels = np.asarray(Image.open(os.path.join(a.root, pretrain[0].image)))
  assert (pixels == tiny_vlm.COLOURS[colour]).all(-1).any()
  assert {t['value'] for t in sft[0].conversations[1::2]} == {colour, shape}
  with open(a.eval_jsonl) as f:
    items = [json.loads(line) for line in f]
  assert len(items) == 8
  assert all(i['answer'] in i['options'] for i in items)


def test_measured_lengths_equal_the_encodings(shapes, tmp_path):
  """Build-time lengths (chunks encoded in a batch) = len(encode(...))."""
  bpe = tokenizer_lib.HFTokenizer(
      conv_cases.write_bpe_tokenizer(tmp_path / 'bpe'))
  image_id = bpe.encode('<image>')[0]
  p = build(shapes.sft_json, shapes.image_dir, bpe, image_token_id=image_id)
  total = sum(len(conversation.encode_conversation(
      s.conversations, bpe, 'phi35', image_token_id=image_id,
      num_image_tokens=N_IMG)[0])
              for s in llava.read_llava_json(shapes.sft_json))
  assert p.num_train_tokens == total


def test_shapes_set_meta_is_checked_after_losing_the_rename(tmp_path,
                                                            monkeypatch):
  """Another process renamed its set into place first: reused only when
  written with the same arguments; a corrupt meta.json is named."""
  kw = dict(num_train=4, num_eval=2, image_size=8)
  theirs = tiny_vlm.write_shapes_dataset(tmp_path / 'theirs', **kw)
  replace = os.replace

  def lose_the_race(src, dst):
    replace(theirs.root, dst)      # their set lands first
    raise OSError(39, 'Directory not empty')

  monkeypatch.setattr(tiny_vlm.os, 'replace', lose_the_race)
  with pytest.raises(ValueError, match='written with'):
    tiny_vlm.write_shapes_dataset(tmp_path / 'a', **dict(kw, seed=1))
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.shapes')]
  monkeypatch.undo()
  theirs = tiny_vlm.write_shapes_dataset(tmp_path / 'theirs', **kw)
  monkeypatch.setattr(tiny_vlm.os, 'replace', lose_the_race)
  assert tiny_vlm.write_shapes_dataset(tmp_path / 'b', **kw).root == str(
      tmp_path / 'b')
  monkeypatch.undo()
  meta = tmp_path / 'b' / tiny_vlm.META
  meta.write_text('{"kind": ')
  with pytest.raises(ValueError, match=f'{meta} is not valid JSON'):
    tiny_vlm.write_shapes_dataset(tmp_path / 'b', **kw)
