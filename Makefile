# Two entry points: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: .venv run test routing-report clean distclean

# (Re)install when setup.cfg or pyproject.toml is newer than the stamp.
.venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

# The user's main command on the CPU-sized config (a few minutes, no files
# needed); a second `make run` resumes / finishes the same workdir.
CONFIG  ?= configs/smoe_154m.py:tiny
WORKDIR ?= runs/smoe_154m_tiny

run: .venv
	$(VENV)/bin/python -m moe_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Routing analysis of tiny runs of several routers on the built-in
# multi-domain corpus: train (tracing every 100 steps), DropTop, expert
# similarity, one report per run and a comparison in runs/routing_compare.
ROUTERS ?= smoe xmoe deepseek_v3

routing-report: .venv
	for r in $(ROUTERS); do \
	  for mode in train droptop similarity; do \
	    $(VENV)/bin/python -m moe_jax.main --config=configs/$${r}_154m.py:tiny \
	      --workdir=runs/$${r}_tiny --mode=$$mode \
	      --config.train.trace_every=100 || exit 1; \
	  done; \
	  $(VENV)/bin/python -m moe_jax.analysis.report --workdir=runs/$${r}_tiny || exit 1; \
	done
	$(VENV)/bin/python -m moe_jax.analysis.report --out=runs/routing_compare \
	  $(foreach r,$(ROUTERS),--workdir=runs/$(r)_tiny)

# Two pytest-xdist workers; --dist loadscope keeps each module (and its
# module-scoped fixtures and compile caches) on one worker. On 2 CPU cores
# this takes the suite from 19 to 12.6 minutes.
PYTEST_ARGS ?= -n 2 --dist loadscope

test: .venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
