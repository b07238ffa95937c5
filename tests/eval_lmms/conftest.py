"""A tiny random LLaVA model, its tokenizer and a tiny shapes set, shared by
the VLM scorer and lmms-eval plugin tests (session scope: built once per
pytest worker, in about two seconds).

The model's tower MLPs are DeepSeek-V3 MoE layers, so the scorer carries a
router state (the bias) as a trained VLM run does; the parameters are drawn
with numpy from the shapes of model.init (no init compile).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import vlm_scorer
from moe_jax.convert import tiny
from moe_jax.data import images as images_lib
from moe_jax.data import tiny_vlm
from moe_jax.data import tokenizer as tokenizer_lib
from moe_jax.models import llava

VOCAB = 384
IMAGE_SIZE = 16
PATCH = 4
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
MAX_LEN = 128
BATCH = 8      # rows per batch; a multiple of the suite's 8 CPU devices


@pytest.fixture(scope='session')
def tokenizer(tmp_path_factory):
  """A byte-level BPE of 384 tokens (tiny.train_tokenizer), as HF files."""
  directory = tmp_path_factory.mktemp('vlm_tokenizer') / 'tok'
  tiny.save_tokenizer(tiny.train_tokenizer(VOCAB, 'llama', num_docs=200),
                      str(directory), 'llama', model_max_length=MAX_LEN)
  return tokenizer_lib.load_hf_tokenizer(directory)


@pytest.fixture(scope='session')
def shapes(tmp_path_factory):
  """4 eval images of 16 x 16: 8 multiple-choice items."""
  return tiny_vlm.write_shapes_dataset(
      tmp_path_factory.mktemp('vlm_shapes') / 'shapes', num_train=1,
      num_eval=4, image_size=IMAGE_SIZE, seed=0)


@pytest.fixture(scope='session')
def items(shapes):
  return vlm_scorer.read_items(shapes.eval_jsonl)


@pytest.fixture(scope='session')
def model_and_variables():
  """(Llava, params, router_state): a one-layer SigLIP-style tower with
  DeepSeek-V3 MoE MLPs, a dense projector and a one-layer dense LLM."""
  tower = dict(kind='siglip', image_size=IMAGE_SIZE, patch_size=PATCH,
               d_model=16, num_layers=1, num_heads=2, mlp_width=32,
               activation='gelu_tanh', norm_eps=1e-6, feature_layer=-1)
  llm = dict(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2,
             head_dim=16, dense_ffn=True,
             ffn=dict(d_model=32, width=64, activation='gelu',
                      use_bias=True))
  model = llava.Llava(
      tower=tower, llm=llm, projector_width=32, image_token_id=VOCAB,
      tower_ffn='moe', projector_ffn='dense',
      moe=dict(num_experts=4, top_k=2, router='deepseek_v3'))
  shapes = nn.unbox(jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0),
                          'router': jax.random.key(1)},
                         **model.example_inputs(8), train=False)))
  rng = np.random.default_rng(0)
  draw = lambda a, scale: jnp.asarray(
      rng.normal(0.0, scale, a.shape).astype(a.dtype))
  params = jax.tree.map(lambda a: draw(a, 0.3), shapes['params'])
  # A non-zero bias, so a scorer that dropped the state would differ.
  router_state = jax.tree.map(lambda a: draw(a, 1.0),
                              dict(shapes.get('router_state', {})))
  return model, params, router_state


@pytest.fixture(scope='session')
def image_spec():
  return images_lib.ImageSpec(size=IMAGE_SIZE)


@pytest.fixture(scope='session')
def scorer(model_and_variables, tokenizer, image_spec):
  model, params, router_state = model_and_variables
  return vlm_scorer.VLMScorer(
      model, params, router_state, tokenizer=tokenizer, image_spec=image_spec,
      template='phi35', image_token_id=VOCAB,
      num_image_tokens=NUM_IMAGE_TOKENS, max_len=MAX_LEN, batch_size=BATCH)
