"""The README's commands run as written in a fresh clone (checked, not run).

Commands are the lines of its ```sh blocks (backslash continuations joined,
comments dropped) and its inline code spans that call python or jupyter.
Training is never started: make targets are looked up in the Makefile,
`-m` modules with importlib.util.find_spec and --config files on disk.
"""

import importlib.util
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / 'README.md'

# A bare interpreter (not .venv/bin/...) at the start of a command or after
# an env assignment, `--` or a shell operator: it is the user's system
# Python (or no jupyter at all), which lacks moe_jax and its dependencies.
_BARE = re.compile(r'(?:^|[\s;&|(])(python3?|jupyter)(?=\s|$)')
_VENV_MODULE = re.compile(r'\.venv/bin/python\s+-m\s+([\w.]+)')
_CONFIG = re.compile(r'--config=(\S+)')
_ASSIGN = re.compile(r'^([A-Za-z_]\w*)=(\S*)$')
# Top-level folders a clone has (runs/ is made by training, so not here).
_TRACKED_ROOTS = ('configs', 'docs', 'eval', 'kernels_pallas', 'launch',
                  'moe_jax', 'notebooks', 'tests')
_PATH = re.compile(r'(?<![\w./<>$-])((?:%s)/[\w./<>|*=-]*)'
                   % '|'.join(_TRACKED_ROOTS))
_PLACEHOLDER = re.compile(r'[<>|*$\[\]]|\.\.\.')


def _fenced_blocks(text):
  """(language, first line number, lines) of each ``` block."""
  blocks, lang, start, body = [], None, 0, None
  for number, line in enumerate(text.splitlines(), 1):
    if line.startswith('```'):
      if body is None:
        lang, start, body = line[3:].strip(), number + 1, []
      else:
        blocks.append((lang, start, body))
        body = None
    elif body is not None:
      body.append(line)
  return blocks


def _expand(command, variables):
  return re.sub(r'\$\{?(\w+)\}?',
                lambda m: variables.get(m.group(1), m.group(0)), command)


def _sh_commands(text):
  """(line number, command) of every command line of the ```sh blocks.

  Continuations are joined, comments dropped, `;`-separated commands split,
  and variables set earlier in the block (W=...; C=...) expanded.
  """
  commands = []
  for lang, start, lines in _fenced_blocks(text):
    if lang not in ('sh', 'bash', 'shell'):
      continue
    variables, pending, first = {}, '', None
    for number, line in enumerate(lines, start):
      line = re.sub(r'(^|\s)#.*$', '', line).rstrip()
      if not line and not pending:
        continue
      first = first or number
      if line.endswith('\\'):
        pending += line[:-1] + ' '
        continue
      joined, pending = ' '.join((pending + line).split()), ''
      for command in (c.strip() for c in joined.split(';')):
        words = command.split()
        if words and all(_ASSIGN.match(w) for w in words):
          variables.update(_ASSIGN.match(w).groups() for w in words)
        elif command:
          commands.append((first, _expand(command, variables)))
      first = None
  return commands


def _fence_flags(text):
  """(inside a fenced block or on a fence, line) for each line."""
  inside = False
  for line in text.splitlines():
    if line.startswith('```'):
      inside = not inside
      yield True, line
    else:
      yield inside, line


def _inline_commands(text):
  """(line number, span) of inline code spans calling python or jupyter."""
  prose = ''.join(
      '\n' if inside else line + '\n' for inside, line in _fence_flags(text))
  spans = []
  for match in re.finditer(r'`([^`\n]+(?:\n[^`\n]+)*)`', prose):
    span = ' '.join(match.group(1).split())
    if re.search(r'(^|[\s/])(python3?|jupyter)(\s|$)', span):
      spans.append((prose.count('\n', 0, match.start()) + 1, span))
  return spans


def _make_targets():
  targets = set()
  for line in (REPO / 'Makefile').read_text(encoding='utf-8').splitlines():
    match = re.match(r'^([\w.%/ -]+?)\s*::?(?!=)', line)
    if match:
      targets.update(match.group(1).split())
  return targets


@pytest.fixture(scope='module')
def readme():
  return README.read_text(encoding='utf-8')


@pytest.fixture(scope='module')
def commands(readme):
  return _sh_commands(readme) + _inline_commands(readme)


def test_the_readme_has_commands(commands):
  # The parser finds the commands (guards against a silently empty check).
  assert any(c.startswith('make run') for _, c in commands)
  assert any('.venv/bin/python -m moe_jax.main' in c for _, c in commands)


def test_make_commands_name_makefile_targets(commands):
  targets = _make_targets()
  errors = []
  for number, command in commands:
    words = command.split()
    if words[:1] != ['make']:
      continue
    for word in words[1:]:
      if not word.startswith('-') and '=' not in word and word not in targets:
        errors.append(f'README.md:{number}: `{command}`: no Makefile target '
                      f'{word!r} (targets: {sorted(targets)})')
  assert not errors, '\n'.join(errors)


def test_no_bare_python_or_jupyter(commands):
  errors = [f'README.md:{number}: `{command}` calls {match.group(1)!r}; '
            f'write .venv/bin/{match.group(1)} (the virtualenv `make` sets '
            'up)'
            for number, command in commands
            for match in [_BARE.search(command)] if match]
  assert not errors, '\n'.join(errors)


def test_python_modules_and_configs_exist(commands):
  errors = []
  for number, command in commands:
    modules = _VENV_MODULE.findall(command)
    for module in modules:
      if importlib.util.find_spec(module) is None:
        errors.append(f'README.md:{number}: `{command}`: no module {module}')
    for config in _CONFIG.findall(command) if modules else ():
      path = config.split(':', 1)[0]
      if not _PLACEHOLDER.search(path) and not (REPO / path).is_file():
        errors.append(f'README.md:{number}: `{command}`: no config file '
                      f'{path} in {REPO}')
  assert not errors, '\n'.join(errors)


def _layout_paths(readme):
  """(line number, path) of the Layout block's entries, from the repo root.

  Entries at column 0 are top-level; those indented by 2 are inside the last
  top-level folder; deeper lines continue a description.
  """
  paths = []
  for lang, start, lines in _fenced_blocks(readme):
    if lang or not lines or not lines[0].startswith('moe_jax/'):
      continue
    parent = ''
    for number, line in enumerate(lines, start):
      match = re.match(r'^( {0,2})([\w.-]+(?:/[\w.-]*)*)(?:\s|$)', line)
      if not match:
        continue
      indent, entry = match.groups()
      if not indent:
        parent = entry if entry.endswith('/') else ''
        paths.append((number, entry))
      else:
        paths.append((number, parent + entry))
  return paths


def test_cited_paths_exist(readme):
  cited = [(readme.count('\n', 0, m.start()) + 1, m.group(1).rstrip('.,'))
           for m in _PATH.finditer(readme)]
  cited = [(n, p) for n, p in cited if not _PLACEHOLDER.search(p)]
  cited += _layout_paths(readme)
  assert any(p.startswith('docs/results/') for _, p in cited)
  errors = [f'README.md:{number}: {path} does not exist in {REPO}'
            for number, path in cited if not (REPO / path).exists()]
  assert not errors, '\n'.join(errors)
