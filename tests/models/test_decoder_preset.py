"""LibMoE's LM stack is the default preset of the generalised decoder.

tests/fixtures/decoder_logits.npz holds the parameter trees and logits of
four tiny LibMoE-preset models, written by tests/fixtures/snapshot_decoder.py
with the decoder as it was before it gained the Hugging Face families'
options. The same config and init key must give the
same parameters (names and shapes) and the same logits.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / 'fixtures'
SAVED = np.load(FIXTURES / 'decoder_logits.npz')


def _snapshot_module():
  path = FIXTURES / 'snapshot_decoder.py'
  spec = importlib.util.spec_from_file_location('snapshot_decoder', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SNAP = _snapshot_module()


@pytest.mark.parametrize('name', SNAP.CASES)
def test_libmoe_preset_has_the_same_params_and_logits(name):
  logits, shapes = SNAP.logits_and_shapes(name)
  assert sorted(f'{k}={v}' for k, v in shapes.items()) == list(
      SAVED[f'{name}/paths'])
  # The same float32 computation. The snapshot was written at XLA's default
  # CPU optimisation level, where the logits came out bitwise equal; the
  # suite compiles at -O0 (tests/conftest.py), whose unoptimised elementwise
  # kernels round a few last bits differently (measured: at most 1.9e-6 on
  # logits of order 1). A changed computation moves them far more.
  np.testing.assert_allclose(logits, SAVED[f'{name}/logits'], rtol=0,
                             atol=1e-5)
