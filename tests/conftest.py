"""Suite-wide set-up: 8 host-platform CPU devices (for tests/multidevice) and
XLA's CPU code generation at -O0 (compile time).

XLA reads the flags once, when the CPU backend starts (the first device query
or computation, which may happen while pytest imports test modules), so they are
set here: the root conftest is imported before any test module. Unsharded
tests use the first device only, as with one device.
"""

import os

# 8 host devices; and LLVM's -O0 for XLA's CPU code: the suite compiles
# hundreds of tiny programs, and on 2 cores compile time dominates (-O0
# took tests/convert/test_upcycle_vlm.py and tests/models/test_scan_layers.py
# from 68 to 45 s). Results agree to float32 rounding: no fast-math either
# way and dots run in the same library kernels, but unoptimised elementwise
# kernels round a few last bits differently (tests/models/
# test_decoder_preset.py). Subprocesses started by tests inherit both.
_FLAGS = ('--xla_force_host_platform_device_count=8',
          '--xla_backend_optimization_level=0')
for _flag in _FLAGS:
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                               _flag).strip()
