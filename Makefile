# comfymgr: `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml requirements.lock 2>/dev/null | sha1sum | cut -c1-12)
BENCH_STAMP := $(VENV)/.bench-$(shell sha1sum pyproject.toml 2>/dev/null | cut -c1-12)

.PHONY: help venv system-deps run test readme lint pyz deploy-check bench contract crash clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv with comfymgr and its test tools

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]' -c requirements.lock  # test what the .pyz ships
	rm -f $(VENV)/.installed-* && touch $@

system-deps: ## install the system packages the tests need (nginx, promtool, ...; Debian/Ubuntu, sudo)
	.ci/system-deps

run: venv ## start comfymgr with the settings in the environment (see README)
	$(BIN)/python comfymgr.py

test: venv ## run the test suite
	$(BIN)/python -m pytest

# COMFYUI_URL is taken from the command line only (make bench COMFYUI_URL=...):
# a COMFYUI_URL exported for `make run` must not send the suite's jobs there.
# BENCH_ARGS goes to bench/run.py as it is (e.g. BENCH_ARGS='--only 9,10 --update-doc').
BENCH_COMFYUI := $(if $(filter command line,$(origin COMFYUI_URL)),$(COMFYUI_URL))

bench: $(BENCH_STAMP) ## measure comfymgr against this machine's limits (BENCH_QUICK=1: shorter); see docs/PERFORMANCE.md
	@command -v wrk >/dev/null || { echo "make bench needs wrk (Debian/Ubuntu: apt-get install wrk)"; exit 2; }
	@# Figure 8 times the .pyz; without one (no network for its wheels) it is skipped, not fatal.
	$(MAKE) --no-print-directory pyz || echo "bench: could not build $(PYZ); the .pyz figure is skipped"
	$(BIN)/python bench/run.py $(if $(BENCH_QUICK),--quick) $(if $(BENCH_COMFYUI),--comfyui-url $(BENCH_COMFYUI)) $(BENCH_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]' -c requirements.lock
	rm -f $(VENV)/.bench-* && touch $@

contract: venv ## the bridge scenarios against a real ComfyUI: make contract COMFYUI_URL=http://127.0.0.1:8188
	@test -n "$${COMFYUI_URL:-}" || { echo "make contract needs COMFYUI_URL=http://host:port"; exit 2; }
	COMFYMGR_CONTRACT_URL="$$COMFYUI_URL" $(BIN)/python -m pytest tests/test_contract.py -v

readme: venv ## regenerate the settings and metrics tables of docs/ from comfymgr.py
	$(BIN)/python tests/doc_tables.py

lint: venv ## static checks
	$(BIN)/ruff check comfymgr.py tests bench

# -- the .pyz ---------------------------------------------------------------
# One zipapp for every CPython in PYZ_PYTHONS on Linux x86_64 (glibc 2.17+).
# The pins in requirements.lock are installed once per version into one
# site-packages: compiled modules carry the version in their file names
# (_quoting_c.cpython-310-x86_64-linux-gnu.so beside ...-311-...), the
# pure-Python files are the same for all. Wheels are kept in $(WHEELS), one
# folder per version, so a rebuild with an unchanged lock is offline.
PYZ := dist/comfymgr.pyz
PYZ_PYTHONS := 3.10 3.11 3.12 3.13
# glibc 2.17+ x86_64 wheels (manylinux2014 and older tags, e.g. frozenlist's
# manylinux_2_5): without the older tags pip would settle for pure-Python
# fallbacks, which run, slower.
PYZ_PLATFORMS := manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64
PYZ_BUILD := build/pyz
SHIV_VERSION := 1.0.8
WHEELS := .cache/wheels
PYZ_VENV := .cache/pyz-venv
PYZ_TOOLS := $(PYZ_VENV)/.shiv-$(SHIV_VERSION)
LOCK_ID := $(shell { cat requirements.lock; echo $(PYZ_PLATFORMS); } 2>/dev/null | sha1sum | cut -c1-12)
WHEEL_STAMPS := $(foreach v,$(PYZ_PYTHONS),$(WHEELS)/$(v)/.lock-$(LOCK_ID))
PIP_TARGET_ARGS = --no-deps --only-binary=:all: --implementation cp --python-version $(1) $(addprefix --platform ,$(PYZ_PLATFORMS))

pyz: $(PYZ) ## build dist/comfymgr.pyz (shiv; CPython 3.10-3.13, Linux x86_64)

$(PYZ): comfymgr.py $(wildcard ui/*) requirements.lock Makefile $(WHEEL_STAMPS) $(PYZ_TOOLS)
	rm -rf $(PYZ_BUILD) && mkdir -p $(PYZ_BUILD)/site-packages $(dir $@)
	for v in $(PYZ_PYTHONS); do \
	  $(PYZ_VENV)/bin/python -m pip install -q --no-index --find-links $(WHEELS)/$$v --no-compile \
	    $(call PIP_TARGET_ARGS,$$v) --target $(PYZ_BUILD)/$$v -r requirements.lock; \
	  cp -a $(PYZ_BUILD)/$$v/. $(PYZ_BUILD)/site-packages/; \
	done
	# Not needed at run time: console scripts, nvidia-ml-py's top-level
	# example.py, Swagger UI's source maps (8 MB /docs never sends) and the
	# debug info in the compiled modules (three quarters of their size).
	cd $(PYZ_BUILD)/site-packages && rm -rf bin example.py && find swagger_ui_bundle -name '*.map' -delete
	if command -v strip >/dev/null; then find $(PYZ_BUILD)/site-packages -name '*.so' -exec strip --strip-debug {} +; fi
	# The RECORD files still list what was just removed, and the console
	# scripts' hashes depend on their first line, the path of the Python that
	# built them: keep only the entries of files that are there, so that the
	# .pyz is the same bytes whichever directory it is built in.
	cd $(PYZ_BUILD)/site-packages && for record in *.dist-info/RECORD; do \
	  while IFS= read -r line; do [ ! -e "$${line%%,*}" ] || printf '%s\n' "$$line"; done \
	    < $$record > $$record.kept && mv $$record.kept $$record; \
	done
	# The dashboard's files (GET /ui) go beside comfymgr.py, where it looks for them.
	cp comfymgr.py $(PYZ_BUILD)/site-packages/
	cp -R ui $(PYZ_BUILD)/site-packages/ui
	$(PYZ_VENV)/bin/shiv --site-packages $(PYZ_BUILD)/site-packages --entry-point comfymgr:main \
	  --python '/usr/bin/env python3' --reproducible --output-file $@.tmp
	mv $@.tmp $@
	@echo "built $@: $$(du -k $@ | cut -f1) KiB, $$(SHIV_ROOT=$(PYZ_BUILD)/shiv $(PYZ_VENV)/bin/python $@ --version)"

$(WHEELS)/%/.lock-$(LOCK_ID): requirements.lock | $(PYZ_TOOLS)
	rm -rf $(@D)
	$(PYZ_VENV)/bin/python -m pip download -q $(call PIP_TARGET_ARGS,$*) --dest $(@D) -r requirements.lock
	touch $@

# The tools that build the .pyz, and nothing else: pip (the venv's own) and shiv.
$(PYZ_TOOLS):
	rm -rf $(PYZ_VENV)
	$(PYTHON) -m venv $(PYZ_VENV)
	$(PYZ_VENV)/bin/python -m pip install -q 'shiv==$(SHIV_VERSION)'
	touch $@

deploy-check: venv ## test the .pyz, systemd units, nginx and Prometheus files
	$(BIN)/python -m pytest tests/test_deploy.py

# The long versions of tests/test_reliability.py: 60 SIGKILLs and 20 SIGTERMs
# under load with the audit after them, then the abuse tests at full size
# (schemathesis 150 examples per operation, 2,000 slow-header clients held
# past aiohttp's 75 s, ...). About 10 minutes; figures in bench/results/.
crash: venv ## the long reliability run (kill -9 under load, faults, abuse); see docs/RELIABILITY.md
	mkdir -p bench/results
	$(BIN)/python bench/crash_harness.py --kills 60 --sigterms 20 --out bench/results/crash.json \
	  --logs bench/results/crash-logs
	rm -f bench/results/reliability-long.jsonl
	COMFYMGR_RELIABILITY_LONG=1 COMFYMGR_RELIABILITY_REPORT=bench/results/reliability-long.jsonl \
	  $(BIN)/python -m pytest tests/test_reliability.py -k 'not crash_harness_short'

clean: ## remove the venv, builds and caches
	rm -rf $(VENV) dist build .cache *.egg-info .pytest_cache
