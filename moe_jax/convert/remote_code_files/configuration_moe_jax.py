"""Configuration of a moe_jax model exported as Hugging Face remote code.

Written by moe_jax/convert/remote_code.py next to the weights and loaded with
`AutoConfig.from_pretrained(DIR, trust_remote_code=True)`. It imports only
transformers: the model is described by

  moe_jax_kwargs   the moe_jax TransformerLM keyword arguments, verbatim as
                   plain JSON (`ffn` = MoEBlock or DenseFFNBlock kwargs);
  moe_jax_router   every RouterConfig field of the MoE layers' router,
                   resolved (defaults filled in by moe_jax), or None for a
                   dense model.

The usual Hugging Face fields (vocab_size, hidden_size, ...) are derived
from them for tools that read those.
"""

from transformers import PretrainedConfig


class MoeJaxConfig(PretrainedConfig):
  """moe_jax TransformerLM kwargs + the resolved router config."""

  model_type = 'moe_jax'

  def __init__(self, moe_jax_kwargs=None, moe_jax_router=None, **kwargs):
    self.moe_jax_kwargs = dict(moe_jax_kwargs or {})
    self.moe_jax_router = (dict(moe_jax_router) if moe_jax_router is not None
                           else None)
    m = self.moe_jax_kwargs
    if m:
      kwargs.setdefault('vocab_size', m['vocab_size'])
      kwargs.setdefault('hidden_size', m['d_model'])
      kwargs.setdefault('num_hidden_layers', m['num_layers'])
      kwargs.setdefault('num_attention_heads', m['num_heads'])
      kwargs.setdefault('num_key_value_heads',
                        m.get('num_kv_heads') or m['num_heads'])
      kwargs.setdefault('head_dim', m['head_dim'])
    # The model computes tied logits itself (moe_jax `tie_embeddings`); the
    # Hugging Face tying machinery has nothing to tie.
    kwargs['tie_word_embeddings'] = False
    super().__init__(**kwargs)
