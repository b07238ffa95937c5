# Two entry points: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: .venv run test routing-report zero-shot-table vlm-tiny clean distclean

# (Re)install when setup.cfg or pyproject.toml is newer than the stamp.
.venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	# lmms-eval without its declared dependencies (they would replace the CPU
	# torch with a CUDA build); what it needs is in setup.cfg's test extra.
	$(VENV)/bin/pip install --no-deps lmms-eval==0.7.3
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

# LibMoE's comparison table on the tiny config: each router x seed trained
# for 400 steps on the C4 sample of ../shared/data (English text, so the
# zero-shot tasks mean something), scored on the seven tasks with offline
# files (at most 200 items per task group), then tabled with 95% CIs and a
# paired t-test against SMoE into runs/zero_shot_sweep/table/.
SHARED      ?= ../shared/data
TABLE_ROUTERS ?= smoe sigmoid deepseek_v3
SEEDS       ?= 2
comma := ,
empty :=
space := $(empty) $(empty)

zero-shot-table: .venv
	$(VENV)/bin/python -m eval.sweep --root=runs/zero_shot_sweep --seeds=$(SEEDS) \
	  --configs=$(subst $(space),$(comma),$(foreach r,$(TABLE_ROUTERS),configs/$(r)_154m.py:tiny)) \
	  --set=data.source=files \
	  --set=data.train_path=$(SHARED)/pretrain/c4_redpajama_sample/tiny_c4_sample.jsonl \
	  --set=data.eval_path=$(SHARED)/pretrain/c4_hf_parquet/c4-validation-00000-of-01637.parquet \
	  --set=train.steps=400 --set=eval.data_dir=$(SHARED)/lm_eval \
	  --tasks=lambada,blimp,piqa,arc,race,siqa,commonsenseqa --max_examples=200

# LibMoE's three vision-language stages on the tiny config (tiny random HF
# Phi-3 + SigLIP and the built-in shapes set, written into the workdirs):
# PT (projector) -> PFT (everything dense) -> SFT (tower + projector
# upcycled to MoE), each starting from the previous stage's checkpoint.
VLM_ROUTER  ?= smoe
VLM_WORKDIR ?= runs/vlm_$(VLM_ROUTER)_tiny

vlm-tiny: .venv
	$(VENV)/bin/python -m moe_jax.main --config=configs/vlm/$(VLM_ROUTER)_pt.py:tiny \
	  --workdir=$(VLM_WORKDIR)/pt
	$(VENV)/bin/python -m moe_jax.main --config=configs/vlm/$(VLM_ROUTER)_pft.py:tiny \
	  --workdir=$(VLM_WORKDIR)/pft --config.init.previous_stage=$(VLM_WORKDIR)/pt
	$(VENV)/bin/python -m moe_jax.main --config=configs/vlm/$(VLM_ROUTER)_sft.py:tiny \
	  --workdir=$(VLM_WORKDIR)/sft --config.init.previous_stage=$(VLM_WORKDIR)/pft

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
