"""Logits of moe_jax and of transformers on one right-padded batch, for the
conversion tests (the same tokens on both sides, compared at real tokens).
"""

import jax.numpy as jnp
import numpy as np

from moe_jax.models import decoder


def padded_batch(vocab_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """tokens, mask [2, 12] int64; row 1 has 7 tokens, right-padded with 0."""
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, vocab_size, (2, 12)).astype(np.int64)
  mask = np.ones((2, 12), np.int64)
  mask[1, 7:] = 0
  tokens[1, 7:] = 0
  return tokens, mask


def jax_logits(kwargs, params, router_state=None) -> np.ndarray:
  """TransformerLM(**kwargs) logits at the real tokens: [N, V]."""
  tokens, mask = padded_batch(kwargs['vocab_size'])
  variables = {'params': params}
  if router_state:
    variables['router_state'] = router_state
  out, _ = decoder.TransformerLM(**kwargs).apply(
      variables, jnp.asarray(tokens, jnp.int32),
      attention_mask=jnp.asarray(mask))
  return np.asarray(out)[mask.astype(bool)]


def torch_logits(model) -> np.ndarray:
  """A transformers causal LM's logits at the real tokens: [N, V]."""
  import torch  # pylint: disable=g-import-not-at-top
  tokens, mask = padded_batch(model.config.vocab_size)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens),
                attention_mask=torch.tensor(mask)).logits.numpy()
  return out[mask.astype(bool)]


def load_hf(directory, **kwargs):
  """AutoModelForCausalLM from a local directory, float32, eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32, local_files_only=True,
      **kwargs).eval()


def save_random_hf(config_class: str, kwargs: dict, directory):
  """A random transformers causal LM of `config_class`(**kwargs), saved to
  `directory`, in eval mode. Norms and biases are random too, so a wrong
  mapping of any tensor shows in the logits."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = getattr(transformers, config_class)(**kwargs)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      config, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if 'norm' in name else 0))
  model.save_pretrained(directory)
  return model
