"""The VLM stages' optimiser schedule and router options against their sources.

The schedule is checked against transformers' get_cosine_schedule_with_warmup
(what LLaVA / LibMoE's HF Trainer runs, with TrainingArguments' ceil rounding
of warmup_ratio=0.03); the router options against algorithms.md §3.3 / §3.8.
"""

import math
import types

import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax import state

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


@pytest.mark.parametrize('stage', ['pt', 'pft', 'sft'])
def test_stage_schedule_is_hf_cosine_with_3_percent_warmup(stage):
  config = config_lib.load_config(f'configs/vlm/smoe_{stage}.py')
  train = config.train
  warmup = math.ceil(0.03 * train.steps)   # TrainingArguments.get_warmup_steps
  optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))],
                              lr=train.learning_rate)
  hf = transformers.get_cosine_schedule_with_warmup(optimizer, warmup,
                                                    train.steps)
  ours = state.learning_rate_schedule(train)
  steps = sorted({0, 1, warmup - 1, warmup, warmup + 1, train.steps // 2,
                  train.steps - 1, train.steps})
  want = [train.learning_rate * hf.lr_lambdas[0](s) for s in steps]
  got = [float(ours(s)) for s in steps]
  # optax evaluates the cosine in float32: near the end, where the rate is
  # ~1e-6 of the peak, its absolute error is ~1e-7 of the peak.
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-6 * train.learning_rate)
  assert got[-1] == pytest.approx(0.0, abs=1e-12)


def test_vlm_router_options_are_libmoes_vlm_ones():
  xmoe = config_lib.load_config('configs/vlm/xmoe_sft.py')
  # §3.3: the VLM's ε ~ N(0, 0.02²) (the LM's is orthogonal).
  assert xmoe.moe.router_options.xmoe_embed_init == 'normal'
  v3 = config_lib.load_config('configs/vlm/deepseek_v3_sft.py')
  # §3.8: LibMoE's VLM smoe_sharev3 has no bias-based balancing.
  assert v3.moe.router_options.bias_update_rate == 0.0
  lm_v3 = config_lib.load_config('configs/deepseek_v3_154m.py')
  assert lm_v3.moe.router_options.bias_update_rate > 0


def test_fresh_projector_has_torch_linear_default_init():
  # LLaVA's mm_projector is two torch.nn.Linear layers built after the LLM
  # loads: weights and biases ~ U(±1/√fan_in). Compare bounds and variance
  # with torch's own init of the same layers.
  from moe_jax.convert import init_vlm
  model = types.SimpleNamespace(projector_in=48, projector_width=64)
  got = init_vlm.fresh_projector(model, seed=0)['ffn']['ffn']
  torch.manual_seed(0)
  first, second = torch.nn.Linear(48, 64), torch.nn.Linear(64, 64)
  want = {'w_in': first.weight.T, 'b_in': first.bias,
          'w_out': second.weight.T, 'b_out': second.bias}
  for name, ref in want.items():
    ref = ref.detach().numpy()
    assert got[name].shape == ref.shape, name
    bound = 1 / math.sqrt(48 if name.endswith('_in') else 64)
    assert np.abs(got[name]).max() <= bound
    if got[name].size > 1000:   # uniform: variance bound² / 3, like torch's
      np.testing.assert_allclose(got[name].var(), bound ** 2 / 3, rtol=0.1)
      np.testing.assert_allclose(ref.var(), bound ** 2 / 3, rtol=0.1)
