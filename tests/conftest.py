"""Suite-wide set-up: 8 host-platform CPU devices (for tests/multidevice).

XLA reads the flag once, when the CPU backend starts (the first device query
or computation, which may happen while pytest imports test modules), so it is
set here: the root conftest is imported before any test module. Unsharded
tests use the first device only, as with one device.
"""

import os

_FLAG = '--xla_force_host_platform_device_count=8'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                             _FLAG).strip()
