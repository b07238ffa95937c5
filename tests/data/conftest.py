"""Fixtures of the data tests: the real sample files and a char tokenizer."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The real sample files live next to the repository (../shared/data).
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


class CharTokenizer:
  """One token per character (its code point): hand-checkable packing."""

  vocab_size = 256

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(int(i)) for i in ids)

  def __repr__(self):
    return "CharTokenizer()"


@pytest.fixture
def char_tokenizer():
  return CharTokenizer()


@pytest.fixture(scope="session")
def shared_data():
  """The ../shared/data directory; skips the test when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real sample data not found at {SHARED_DATA} "
                "(expected ../shared/data next to the repository)")
  return SHARED_DATA


def shared_file(root, relative):
  """A file under ../shared/data; skips the test when it is absent."""
  path = os.path.join(root, relative)
  if not os.path.exists(path):
    pytest.skip(f"sample {relative} not found under {root}")
  return path
