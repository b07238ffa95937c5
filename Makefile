# Two entry points: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: .venv run test clean distclean

# (Re)install when setup.cfg or pyproject.toml is newer than the stamp.
.venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

run: .venv
	$(VENV)/bin/python -m moe_jax.bench.layer

test: .venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
