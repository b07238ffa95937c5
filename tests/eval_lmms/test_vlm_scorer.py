"""eval/vlm_scorer.py against a naive forward of the tiny LLaVA model.

The reference scores one request at a time: its ids are the template's
prompt (conversation.generation_prompt, the encoding contract) followed by
the separately encoded continuation, run through model.apply as one
unpadded row with no attention mask (images=None for a text-only request),
and the log-softmax is taken in numpy. The scorer batches, pads to bucket
lengths, shards rows over the 8 CPU devices and masks padding; the sums
must agree to 1e-5.
"""

import os

import jax
import numpy as np
from PIL import Image
import pytest

from eval import vlm_scorer
from moe_jax.data import conversation
from moe_jax.data import images as images_lib

from tests.eval_lmms import conftest

COLOUR = 'What colour is the shape?'
SHAPE = 'What shape is it?'


_FORWARD = {}


def _forward(model):
  """jit(model.apply) -> logits, one per model (flax modules with dict
  fields do not hash)."""
  if id(model) not in _FORWARD:
    _FORWARD[id(model)] = jax.jit(lambda variables, tokens, images: (
        model.apply(variables, tokens, images, train=False)[0]))
  return _FORWARD[id(model)]


def naive_logits(model_and_variables, ids, image):
  """logits [S, V] float64 of one unpadded row (image: [H, W, C] or None)."""
  model, params, router_state = model_and_variables
  variables = {'params': params}
  if router_state:
    variables['router_state'] = router_state
  images = None if image is None else image[None]
  logits = _forward(model)(variables, np.asarray([ids], np.int32), images)
  return np.asarray(logits[0], np.float64)


def naive_score(model_and_variables, tokenizer, image_spec, image_path,
                context, continuation):
  """(sum log p of the continuation, all greedy), one request alone."""
  prompt = list(conversation.generation_prompt(
      context, tokenizer, 'phi35', image_token_id=conftest.VOCAB,
      num_image_tokens=conftest.NUM_IMAGE_TOKENS, image=image_path is not None))
  cont = list(tokenizer.encode(continuation))
  ids = prompt + cont
  image = (None if image_path is None else
           images_lib.load_image(image_path, image_spec))
  logits = naive_logits(model_and_variables, ids[:-1], image)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  rows = np.arange(len(ids) - 1)[-len(cont):]
  targets = np.asarray(ids[1:])[-len(cont):]
  return (float(logp[rows, targets].sum()),
          bool(np.all(logits[rows].argmax(-1) == targets)))


def test_loglikelihood_equals_naive_forward(scorer, model_and_variables,
                                            tokenizer, image_spec, shapes,
                                            items):
  first = os.path.join(shapes.image_dir, items[0]['image'])
  second = os.path.join(shapes.image_dir, items[2]['image'])
  requests = [(first, COLOUR, 'red'), (second, COLOUR, 'red'),
              (second, SHAPE, 'a red circle'), (None, COLOUR, 'blue'),
              (first, COLOUR, 'red')]          # a repeat, scored alike
  want = [naive_score(model_and_variables, tokenizer, image_spec, *r)
          for r in requests]
  got = scorer.loglikelihood(requests)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want],
                             rtol=0, atol=1e-5)
  assert [g[1] for g in got] == [w[1] for w in want]
  assert got[0] == got[-1]
  # The image matters (the same text with another image scores otherwise),
  # and a PIL image scores as its file does.
  assert abs(got[0][0] - got[1][0]) > 1e-4
  with Image.open(first) as image:
    assert scorer.loglikelihood([(image, COLOUR, 'red')])[0] == pytest.approx(
        got[0], abs=1e-6)


def test_generate_is_the_naive_greedy_loop(scorer, model_and_variables,
                                           tokenizer, image_spec, shapes,
                                           items):
  path = os.path.join(shapes.image_dir, items[1]['image'])
  ids = list(conversation.generation_prompt(
      SHAPE, tokenizer, 'phi35', image_token_id=conftest.VOCAB,
      num_image_tokens=conftest.NUM_IMAGE_TOKENS))
  image = images_lib.load_image(path, image_spec)
  # Causal attention: a row's logits do not depend on later columns, so
  # the loop runs in one [1, n + 3] buffer (one compile).
  buffer = ids + [0] * 3
  new = []
  for k in range(3):
    logits = naive_logits(model_and_variables, buffer, image)
    new.append(int(logits[len(ids) + k - 1].argmax()))
    buffer[len(ids) + k] = new[-1]
  # The answer ends at eos or at phi35's end of turn.
  if tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  want = tokenizer.decode(new).split('<|end|>')[0]
  got, = scorer.generate([(path, SHAPE, 3, [])])
  assert got == want
  if list(tokenizer.encode(want)) == new:
    # The greedy answer, teacher forced, is greedy.
    assert scorer.loglikelihood([(path, SHAPE, want)])[0][1]
  if len(want) >= 2:
    # A stop string cuts the text before it.
    cut, = scorer.generate([(path, SHAPE, 3, [want[1:]])])
    assert cut == want[:want.index(want[1:])]


def test_score_choices_is_the_argmax_of_option_logprobs(scorer, items,
                                                        shapes):
  lls = scorer.choice_logprobs(items, image_dir=shapes.image_dir)
  assert [len(l) for l in lls] == [len(i['options']) for i in items]
  want = np.mean([i['options'][int(np.argmax(l))] == i['answer']
                  for l, i in zip(lls, items)])
  assert scorer.score_choices(items, image_dir=shapes.image_dir) == want
  flat = scorer.loglikelihood(
      [(os.path.join(shapes.image_dir, i['image']), i['question'], o)
       for i in items for o in i['options']])
  assert [x for l in lls for x in l] == [f[0] for f in flat]


def test_answer_must_be_an_option(scorer, items, shapes):
  bad = [dict(items[0], answer='purple')]
  with pytest.raises(ValueError, match="item 0.*'purple' is not one of"):
    scorer.score_choices(bad, image_dir=shapes.image_dir)


def test_over_long_request_names_it(scorer, shapes, items):
  path = os.path.join(shapes.image_dir, items[0]['image'])
  long = ' '.join(['shape'] * 200)
  with pytest.raises(ValueError, match=r'request 1: .*exceed max_len=128'):
    scorer.loglikelihood([(path, COLOUR, 'red'), (path, long, 'red')])
  with pytest.raises(ValueError, match='request 0: .*no room to generate'):
    scorer.generate([(path, long, 4, [])])


def test_missing_image_and_empty_continuation_are_named(scorer, tmp_path):
  with pytest.raises(FileNotFoundError, match='sample 1'):
    scorer.loglikelihood([(None, COLOUR, 'red'),
                          (str(tmp_path / 'none.png'), COLOUR, 'red')])
  with pytest.raises(ValueError, match='request 0: continuation'):
    scorer.loglikelihood([(None, COLOUR, '')])


def test_read_items_names_a_bad_line(tmp_path):
  path = tmp_path / 'eval.jsonl'
  path.write_text('{"question": "q"}\nnot json\n')
  with pytest.raises(ValueError, match='eval.jsonl:2'):
    vlm_scorer.read_items(path)
