"""LAMBADA reader: lambada/lambada_test.jsonl (eval/lambada.py scores it).

Kept here so that every task of the registry (eval/tasks/__init__.py) has a
module; LAMBADA's items and greedy scoring live in eval/lambada.py because
it is not a multiple-choice task.
"""

from __future__ import annotations

from eval.lambada import DISPLAY, FILE, LambadaItem, load

__all__ = ['DISPLAY', 'FILE', 'LambadaItem', 'load']
