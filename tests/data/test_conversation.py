"""Conversation templates: golden ids / masks by hand, and LLaVA parity.

Two tiny HF tokenizers, both with the Phi-3 chat markers and `<image>` as
added special tokens:
  word: a WordLevel vocabulary with one token per word, space and newline,
    so the golden ids are written by hand;
  bpe: a SentencePiece-style BPE (normalizer Prepend('▁') + Replace(' ',
    '▁'), as Phi-3's tokenizer.json), where encoding a piece on its own
    differs from encoding it in context ('▁red' vs 'red' after
    '<|assistant|>\\n'); with rstrip=True its markers eat the newline after
    them, as Phi-3's do. Checked against LLaVA's tokenizer_image_token on
    the LibMoE phi35 prompt, with the mask from transformers'
    PreTrainedTokenizerFast offset mapping (an independent mechanism).
"""

import json
import os

import numpy as np
import pytest
from tokenizers import AddedToken
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import Regex
from tokenizers import Tokenizer
from tokenizers import trainers

from moe_jax.data import conversation
from moe_jax.data import tokenizer as tokenizer_lib

SPECIAL = ['<s>', '</s>', '<unk>', '<|system|>', '<|user|>', '<|assistant|>',
           '<|end|>', '<image>']
WORDS = ['\n', ' ', 'a', 'red', 'circle', 'What', 'colour', 'is', 'the',
         'shape', '?', 'You', 'are', 'helpful', 'assistant', '.', 'it',
         'green', 'square', 'blue', 'yellow', 'triangle']
IMAGE_ID = SPECIAL.index('<image>')   # 7
N_IMG = 3


def _write_dir(tk, out_dir):
  os.makedirs(out_dir, exist_ok=True)
  tk.save(os.path.join(out_dir, 'tokenizer.json'))
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>',
               'tokenizer_class': 'PreTrainedTokenizerFast'}, f)
  return str(out_dir)


def write_word_tokenizer(out_dir):
  """A WordLevel HF tokenizer dir: id = index in SPECIAL + WORDS."""
  vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
  tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tk.pre_tokenizer = pre_tokenizers.Split(Regex(r'\w+|[^\w]'),
                                          behavior='isolated')
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                         for t in SPECIAL])
  return _write_dir(tk, out_dir)


def write_bpe_tokenizer(out_dir, rstrip=False):
  """A Phi-3-like (SentencePiece-style) BPE HF tokenizer dir.

  rstrip: the chat markers strip the whitespace after them (Phi-3's
  tokenizer.json marks its added tokens so).
  """
  tk = Tokenizer(models.BPE(unk_token='<unk>', fuse_unk=True))
  tk.normalizer = normalizers.Sequence([normalizers.Prepend('▁'),
                                        normalizers.Replace(' ', '▁')])
  tk.decoder = decoders.Sequence([decoders.Replace('▁', ' '),
                                  decoders.Strip(' ', 1, 0)])
  corpus = ['a red circle', 'a green square', 'What colour is the shape?',
            'What shape is it?', 'You are a helpful assistant.', 'red',
            'circle\n', 'blue triangle', 'yellow'] * 5
  tk.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=120, special_tokens=SPECIAL,
      initial_alphabet=list('\n▁?.')))
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False,
                                    rstrip=rstrip and t.startswith('<|'))
                         for t in SPECIAL])
  return _write_dir(tk, out_dir)


@pytest.fixture(scope='module')
def word_tok(tmp_path_factory):
  return tokenizer_lib.HFTokenizer(
      write_word_tokenizer(tmp_path_factory.mktemp('word')))


def _ids(*tokens):
  vocab = SPECIAL + WORDS
  return [vocab.index(t) for t in tokens]


SFT = [{'from': 'human', 'value': 'What colour is the shape?\n<image>'},
       {'from': 'gpt', 'value': 'red'},
       {'from': 'human', 'value': 'What shape is it?'},
       {'from': 'gpt', 'value': 'a circle'}]
PLAIN = [{'from': 'human', 'value': 'some ignored text <image>'},
         {'from': 'gpt', 'value': 'a red circle'}]


def test_phi35_golden_ids_and_mask(word_tok):
  ids, mask = conversation.encode_conversation(
      SFT, word_tok, 'phi35', image_token_id=IMAGE_ID,
      num_image_tokens=N_IMG)
  system = (_ids('<s>', '<|system|>', '\n', 'You', ' ', 'are', ' ', 'a', ' ',
                 'helpful', ' ', 'assistant', '.', '<|end|>', '\n'))
  # The tag moves to the front: '<image>\n' + rest.strip() (LLaVA).
  user1 = (_ids('<|user|>', '\n') + [IMAGE_ID] * N_IMG +
           _ids('\n', 'What', ' ', 'colour', ' ', 'is', ' ', 'the', ' ',
                'shape', '?', '<|end|>', '\n', '<|assistant|>', '\n'))
  answer1 = _ids('red', '<|end|>', '\n')
  user2 = _ids('<|user|>', '\n', 'What', ' ', 'shape', ' ', 'is', ' ', 'it',
               '?', '<|end|>', '\n', '<|assistant|>', '\n')
  answer2 = _ids('a', ' ', 'circle', '<|end|>', '\n')
  expected = system + user1 + answer1 + user2 + answer2
  expected_mask = ([0] * len(system + user1) + [1] * len(answer1) +
                   [0] * len(user2) + [1] * len(answer2))
  assert ids.dtype == np.int32 and mask.dtype == np.float32
  np.testing.assert_array_equal(ids, expected)
  np.testing.assert_array_equal(mask, expected_mask)


def test_plain_golden_ids_and_mask(word_tok):
  ids, mask = conversation.encode_conversation(
      PLAIN, word_tok, 'plain', image_token_id=IMAGE_ID,
      num_image_tokens=N_IMG)
  # preprocess_plain: '<image>' + caption + '\n'; loss on caption + '\n'.
  caption = _ids('a', ' ', 'red', ' ', 'circle', '\n')
  np.testing.assert_array_equal(ids, _ids('<s>') + [IMAGE_ID] * N_IMG +
                                caption)
  np.testing.assert_array_equal(mask, [0] * (1 + N_IMG) + [1] * len(caption))
  ids, _ = conversation.encode_conversation(
      PLAIN, word_tok, 'plain', image_token_id=IMAGE_ID,
      num_image_tokens=N_IMG, add_bos=False)
  assert ids[0] == IMAGE_ID


def test_generation_prompt_is_the_training_prefix(word_tok):
  prompt = conversation.generation_prompt(
      'What colour is the shape?', word_tok, 'phi35',
      image_token_id=IMAGE_ID, num_image_tokens=N_IMG)
  ids, mask = conversation.encode_conversation(
      SFT[:2], word_tok, 'phi35', image_token_id=IMAGE_ID,
      num_image_tokens=N_IMG)
  first_answer = int(np.argmax(mask))
  np.testing.assert_array_equal(prompt, ids[:first_answer])
  plain = conversation.generation_prompt(
      '', word_tok, 'plain', image_token_id=IMAGE_ID, num_image_tokens=N_IMG)
  np.testing.assert_array_equal(plain, _ids('<s>') + [IMAGE_ID] * N_IMG)


def _reference(turns, hf, image_token_id, num_image_tokens):
  """LLaVA / LibMoE's ids, and the assistant spans' tokens by offsets.

  ids: preprocess_multimodal (tag to the front) + conv_phi_35 get_prompt +
  tokenizer_image_token (chunks between tags encoded on their own, one
  bos), with the image placeholder expanded to N ids (the model's
  expansion). Mask: 1 on tokens whose character offsets start inside an
  assistant span (answer + '<|end|>\\n'), from the fast tokenizer's
  offset mapping.
  """
  sep = '<|end|>\n'
  prompt = '<|system|>\n' + conversation.PHI35_SYSTEM + sep
  spans = []
  for i, t in enumerate(turns):
    value = t['value']
    if '<image>' in value:
      value = ('<image>\n' + value.replace('<image>', '').strip()).strip()
    if i % 2 == 0:
      prompt += '<|user|>\n' + value + sep + '<|assistant|>\n'
    else:
      spans.append((len(prompt), len(prompt) + len(value + sep)))
      prompt += value + sep
  ids = [hf.convert_tokens_to_ids('<s>')]
  mask = [0.0]
  offset = 0
  for k, chunk in enumerate(prompt.split('<image>')):
    if k:
      ids += [image_token_id] * num_image_tokens
      mask += [0.0] * num_image_tokens
      offset += len('<image>')
    enc = hf(chunk, add_special_tokens=False, return_offsets_mapping=True)
    ids += enc.input_ids
    mask += [float(any(a <= offset + s < b for a, b in spans))
             for s, _ in enc.offset_mapping]
    offset += len(chunk)
  return np.array(ids), np.array(mask, np.float32)


@pytest.mark.parametrize('rstrip', [False, True])
@pytest.mark.parametrize('turns', [
    SFT,
    [{'from': 'human', 'value': '<image>\nWhat shape is it?'},
     {'from': 'gpt', 'value': 'a blue triangle'}],
    [{'from': 'human', 'value': 'What colour is the shape?'},
     {'from': 'gpt', 'value': 'yellow.'}],
])
def test_phi35_matches_llava_on_a_sentencepiece_style_tokenizer(
    tmp_path, turns, rstrip):
  """rstrip=True: Phi-3's added tokens eat the newline after them."""
  transformers = pytest.importorskip('transformers')
  bpe_dir = write_bpe_tokenizer(tmp_path / 'bpe', rstrip=rstrip)
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(bpe_dir, 'tokenizer.json'))
  tok = tokenizer_lib.HFTokenizer(bpe_dir)
  image_id = hf.convert_tokens_to_ids('<image>')
  ids, mask = conversation.encode_conversation(
      turns, tok, 'phi35', image_token_id=image_id, num_image_tokens=N_IMG)
  ref_ids, ref_mask = _reference(turns, hf, image_id, N_IMG)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  if not rstrip:
    # The case this guards: an answer encoded on its own gets a '▁'.
    alone = tok.encode(turns[1]['value'] + '<|end|>\n')
    assert list(ids[mask == 1][:len(alone)]) != alone


@pytest.mark.parametrize('turns, message', [
    ([{'from': 'gpt', 'value': 'x'}, {'from': 'human', 'value': 'y'}],
     r"conversations\[0\].from='gpt'"),
    ([{'from': 'human', 'value': 'x'}, {'from': 'human', 'value': 'y'}],
     r"conversations\[1\].from='human'"),
    ([{'from': 'system', 'value': 'x'}], r"conversations\[0\].from='system'"),
    ([{'from': 'human', 'value': 'x'}], 'ends with a human turn'),
    ([], 'empty'),
])
def test_bad_turns(word_tok, turns, message):
  with pytest.raises(ValueError, match=message):
    conversation.encode_conversation(turns, word_tok, 'phi35',
                                     image_token_id=IMAGE_ID,
                                     num_image_tokens=N_IMG)


def test_bad_plain_and_template(word_tok):
  kw = dict(image_token_id=IMAGE_ID, num_image_tokens=N_IMG)
  with pytest.raises(ValueError, match='expected 2 turns'):
    conversation.encode_conversation(SFT, word_tok, 'plain', **kw)
  with pytest.raises(ValueError, match='has no <image>'):
    conversation.encode_conversation(
        [{'from': 'human', 'value': 'x'}, {'from': 'gpt', 'value': 'y'}],
        word_tok, 'plain', **kw)
  with pytest.raises(ValueError, match="template='vicuna'"):
    conversation.encode_conversation(SFT, word_tok, 'vicuna', **kw)
  for template in conversation.TEMPLATES:
    conversation.check_template(template)
  with pytest.raises(ValueError, match=r"^template='': expected one of"):
    conversation.check_template('')
