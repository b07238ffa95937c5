"""The tests of this directory need 8 CPU devices.

tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8
before JAX starts; this checks that it took effect.
"""

import pytest


@pytest.fixture(scope='session', autouse=True)
def eight_devices():
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() != 8:
    pytest.fail(f'expected 8 CPU devices, found {jax.device_count()}: the '
                'CPU backend started before tests/conftest.py set XLA_FLAGS '
                '(--xla_force_host_platform_device_count=8).')
