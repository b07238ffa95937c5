"""8 host-platform CPU devices for the tests of this directory.

XLA reads the flag when the CPU backend starts (the first device query or
computation), so it is set here, at collection, before any test runs. The
rest of the suite then also sees 8 CPU devices; unsharded code uses the
first one only.
"""

import os

import pytest

_FLAG = '--xla_force_host_platform_device_count=8'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                             _FLAG).strip()


@pytest.fixture(scope='session', autouse=True)
def eight_devices():
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() != 8:
    pytest.fail(f'expected 8 CPU devices, found {jax.device_count()}: the '
                'CPU backend started before this conftest set XLA_FLAGS '
                f'({_FLAG}); run tests/multidevice in its own process.')
