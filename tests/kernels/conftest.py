"""Registers the `serial` marker of the kernel tests (style.md §5)."""


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'serial: run alone, not in parallel (interpret-mode kernels)')
