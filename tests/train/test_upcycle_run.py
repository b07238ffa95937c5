"""Upcycling end to end: a tiny random Llama (moe_jax/convert/tiny.py, no
torch), `python -m moe_jax.main --config=configs/upcycle/llama_smoe.py:tiny
--config.init.hf_path=DIR`, 50 steps on tinyshakespeare lower the loss, and
the trained run exports to Mixtral, where transformers computes moe_jax's
logits (to 1e-4)."""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax import restore
from moe_jax import run_log
from moe_jax.convert import tiny

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAKESPEARE = (REPO / '..' / 'shared' / 'data' /
               'tinyshakespeare.txt').resolve()
CONFIG = 'configs/upcycle/llama_smoe.py:tiny'


def environment():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return env


def run(args, **kwargs):
  proc = subprocess.run([sys.executable, '-m', *args], cwd=REPO,
                        env=environment(), capture_output=True, text=True,
                        timeout=600, **kwargs)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.skipif(not SHAKESPEARE.is_file(),
                    reason=f'{SHAKESPEARE} is absent (the shared data lies '
                    'beside the checkout on the development machines only)')
def test_upcycled_llama_trains_on_shakespeare_and_exports(tmp_path):
  hf_dir = tiny.write_tiny_hf(str(tmp_path / 'tiny_llama'), 'llama')
  workdir = tmp_path / 'run'
  overrides = [f'--config.init.hf_path={hf_dir}',
               '--config.data.source=files',
               f'--config.data.train_path={SHAKESPEARE}',
               '--config.data.doc_mode=paragraph',
               '--config.data.max_tokens=100000',
               '--config.train.steps=50', '--config.train.log_every=10',
               '--config.train.eval_every=50',
               '--config.train.checkpoint_every=50']
  proc = run(['moe_jax.main', f'--config={CONFIG}', f'--workdir={workdir}',
              *overrides])
  assert f'starting from {hf_dir}, upcycled to 4 smoe experts' in proc.stderr
  frame = run_log.read_metrics(str(workdir))
  assert len(frame) == 50
  first, last = frame['loss'].iloc[0], frame['loss'].iloc[-5:].mean()
  assert last < first - 0.5, (first, last)
  # Export the trained run and compare transformers with moe_jax.
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  out = tmp_path / 'mixtral'
  run(['moe_jax.convert', 'export', f'--workdir={workdir}', '--to=mixtral',
       f'--out={out}'])
  config = config_lib.load_config(str(REPO / CONFIG.split(':')[0]) + ':tiny')
  config.init.hf_path = hf_dir
  restored = restore.restore_run(config, str(workdir))
  assert restored.step == 50
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 400, (2, 16))
  mask = np.ones_like(tokens)
  mask[1, 10:] = 0
  got, _ = restored.model.apply(restored.variables, jnp.asarray(tokens),
                                attention_mask=jnp.asarray(mask))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, local_files_only=True).eval()
  with torch.no_grad():
    want = model(input_ids=torch.tensor(tokens),
                 attention_mask=torch.tensor(mask)).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-4,
                             rtol=1e-4)
