"""The LLaVA model: splice, and parity with transformers' LlavaForConditionalGeneration.

(a) Tiny random LlavaForConditionalGeneration models (SigLIP + Phi-3 and
CLIP + Llama), float32, eager attention, saved with save_pretrained and
imported by moe_jax.convert.llava: our logits equal torch's to 1e-4 on a
right-padded batch where two rows hold an image and one holds none (HF gets
pixel_values for the two image rows only; ours gets a junk image for the
third, which must be ignored).
(b) The tiny Phi-3 LLM alone against Phi3ForCausalLM is covered by
tests/convert/test_hf_import.py (case 'phi3').
(c) decoder.splice against a numpy loop, and TransformerLM(spliced=...)
against the plain token lookup when the spliced rows are embedding rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import decoder

B, S, N = 3, 24, 16          # N image rows: (16 / 4)² patches


# ------------------------------------------------------------- (c) splice ---

def test_splice_matches_numpy_loop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 7, 5)).astype(np.float32)
  values = rng.normal(size=(3, 4, 5)).astype(np.float32)
  mask = np.zeros((3, 7), bool)
  mask[0, [1, 2, 3, 4]] = True          # all four rows
  mask[1, [0, 5]] = True                # fewer positions than rows
  got = np.asarray(decoder.splice(jnp.asarray(x), jnp.asarray(mask),
                                  jnp.asarray(values)))
  want = x.copy()
  for b in range(3):
    j = 0
    for s in range(7):
      if mask[b, s]:
        want[b, s] = values[b, j]
        j += 1
  np.testing.assert_array_equal(got, want)


def test_spliced_embedding_rows_equal_the_token_lookup():
  model = decoder.TransformerLM(
      vocab_size=32, d_model=16, num_layers=1, num_heads=2, head_dim=8,
      dense_ffn=True, ffn=dict(d_model=16, width=32, activation='relu'))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 6)))
  params = model.init(jax.random.key(0), tokens)
  want, _ = model.apply(params, tokens)
  mask = jnp.asarray([[0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
  embed = params['params']['embedding'].value
  # The masked positions hold an out-of-vocabulary placeholder id; the rows
  # spliced there are the embeddings of the original tokens.
  rows = jnp.stack([embed[tokens[0, jnp.asarray([1, 2, 5])]],
                    jnp.zeros((3, 16))])                       # [2, 3, 16]
  placeholder = jnp.where(mask, 10_000, tokens)
  got, _ = model.apply(params, placeholder, spliced=(mask, rows))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(np.isfinite(got), True)


# --------------------------------------------------------- (a) HF parity ---

IMAGE_TOKEN = 5


def _build_hf(case, directory):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  tower = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=3,
               num_attention_heads=2, image_size=16, patch_size=4,
               num_channels=3)
  text = dict(vocab_size=64, hidden_size=32, intermediate_size=40,
              num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
  if case == 'siglip_phi3':
    vision_config = transformers.SiglipVisionConfig(**tower)
    text_config = transformers.Phi3Config(**text)
    strategy = 'full'
  else:
    vision_config = transformers.CLIPVisionConfig(**tower)
    text_config = transformers.LlamaConfig(**text, head_dim=8)
    strategy = 'default'
  config = transformers.LlavaConfig(
      vision_config=vision_config, text_config=text_config,
      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
      vision_feature_select_strategy=strategy)
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration._from_config(
      config, attn_implementation='eager', dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if 'norm' in name else 0.0))
      elif 'embedding' in name or 'class_embedding' in name:
        p.copy_(torch.randn_like(p) * 0.5)
  model.save_pretrained(directory)
  return model


def _batch():
  """Tokens [3, S] (rows 0, 1 with N image tokens, row 2 none), mask,
  images [3, 16, 16, 3] NHWC."""
  rng = np.random.default_rng(2)
  tokens = rng.integers(6, 64, (B, S))
  mask = np.ones((B, S), np.int64)
  tokens[0, 1:1 + N] = IMAGE_TOKEN
  tokens[1, 3:3 + N] = IMAGE_TOKEN
  mask[1, 22:] = 0
  mask[2, 10:] = 0
  tokens[mask == 0] = 0
  images = rng.normal(size=(B, 16, 16, 3)).astype(np.float32)
  return tokens, mask, images


@pytest.fixture(scope='module', params=['siglip_phi3', 'clip_llama'])
def hf_case(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  model = _build_hf(request.param, directory)
  return request.param, model, directory


def test_imported_llava_logits_equal_torch(hf_case):
  torch = pytest.importorskip('torch')
  from moe_jax.convert import llava as convert_llava  # pylint: disable=g-import-not-at-top
  from moe_jax.models import llava  # pylint: disable=g-import-not-at-top
  case, hf_model, directory = hf_case
  tokens, mask, images = _batch()
  with torch.no_grad():
    pixels = torch.tensor(images[:2]).permute(0, 3, 1, 2)       # NCHW
    want = hf_model(input_ids=torch.tensor(tokens),
                    attention_mask=torch.tensor(mask),
                    pixel_values=pixels).logits.numpy()
  kwargs, params = convert_llava.import_llava(str(directory))
  assert kwargs['tower']['kind'] == case.split('_')[0]
  assert kwargs['image_token_id'] == IMAGE_TOKEN
  model = llava.Llava(**kwargs)
  apply = jax.jit(lambda im: model.apply(
      {'params': params}, jnp.asarray(tokens, jnp.int32), im,
      attention_mask=jnp.asarray(mask)))
  got, auxes = apply(jnp.asarray(images))
  assert auxes == []
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-4,
                             rtol=1e-4)
  # Not vacuous: the images reach the logits of the image rows only.
  other, _ = apply(jnp.asarray(images[::-1].copy()))
  assert np.abs(np.asarray(other)[:2] - want[:2]).max() > 1e-2
  np.testing.assert_allclose(np.asarray(other)[2][real[2]],
                             want[2][real[2]], atol=1e-4, rtol=1e-4)


def test_siglip_default_feature_strategy_is_refused(tmp_path):
  transformers = pytest.importorskip('transformers')
  from moe_jax.convert import llava as convert_llava  # pylint: disable=g-import-not-at-top
  config = transformers.LlavaConfig(
      vision_config=transformers.SiglipVisionConfig(
          hidden_size=16, intermediate_size=24, num_hidden_layers=1,
          num_attention_heads=2, image_size=16, patch_size=4),
      text_config=transformers.Phi3Config(
          vocab_size=64, hidden_size=32, intermediate_size=40,
          num_hidden_layers=1, num_attention_heads=4, pad_token_id=0),
      vision_feature_select_strategy='default')
  with pytest.raises(ValueError, match='vision_feature_select_strategy'):
    convert_llava.llava_kwargs(config, 'config.json')


def test_moe_llm_is_refused_naming_the_field():
  """The VLM's LLM is dense: an MoE LLM is refused, not half-supported."""
  from moe_jax.models import llava  # pylint: disable=g-import-not-at-top
  llm = dict(vocab_size=32, d_model=16, num_layers=1, num_heads=2,
             head_dim=8, dense_ffn=False,
             ffn=dict(router='smoe', num_experts=4, top_k=2, d_model=16,
                      expert_width=16))
  tower = dict(kind='siglip', image_size=16, patch_size=4, d_model=16,
               num_layers=1, num_heads=2, mlp_width=24,
               activation='gelu_tanh', norm_eps=1e-6)
  model = llava.Llava(tower=tower, llm=llm, projector_width=16,
                      image_token_id=5)
  with pytest.raises(ValueError, match='llm.dense_ffn'):
    jax.eval_shape(lambda: model.init(jax.random.key(0),
                                      **model.example_inputs(4)))


# ------------------------------------------- (b) the tiny Phi-3 LLM alone ---

def test_tiny_phi3_loads_in_transformers_with_chat_tokens(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from moe_jax.convert import hf_import  # pylint: disable=g-import-not-at-top
  from moe_jax.convert import tiny  # pylint: disable=g-import-not-at-top
  directory = tiny.write_tiny_hf(str(tmp_path / 'phi3'), 'phi3',
                                 vocab_size=320, d_model=32, num_heads=4,
                                 num_kv_heads=2, head_dim=8,
                                 intermediate_size=48)
  auto = transformers.AutoTokenizer.from_pretrained(directory,
                                                    local_files_only=True)
  text = '<|user|>\n<image>\nWhat shape?<|end|>\n<|assistant|>\nA circle.<|end|>'
  ids = auto(text, add_special_tokens=False).input_ids
  pieces = auto.convert_ids_to_tokens(ids)
  for special in tiny.EXTRA_SPECIAL_TOKENS['phi3']:
    if special != '<|system|>':
      assert special in pieces, special        # one token, never split
  assert auto.eos_token == auto.pad_token == '<|endoftext|>'
  assert auto.apply_chat_template(
      [{'role': 'user', 'content': 'hi'}], tokenize=False,
      add_generation_prompt=True) == '<|user|>\nhi<|end|>\n<|assistant|>\n'
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, local_files_only=True).eval()
  assert type(model).__name__ == 'Phi3ForCausalLM'
  tokens = np.asarray([ids[:12], ids[-12:]], np.int64)
  with torch.no_grad():
    want = model(input_ids=torch.tensor(tokens)).logits.numpy()
  _, params, kwargs = hf_import.import_hf(directory, progress=False)
  got, _ = decoder.TransformerLM(**kwargs).apply(
      {'params': params}, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
