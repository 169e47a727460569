# comfymgr: `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml requirements.lock 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: help venv run test lint pyz bench contract clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv with comfymgr and its test tools

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	rm -f $(VENV)/.installed-* && touch $@

run: venv ## start comfymgr with the settings in the environment (see README)
	$(BIN)/python comfymgr.py

test: venv ## run the test suite
	$(BIN)/python -m pytest

lint: venv ## static checks
	$(BIN)/ruff check comfymgr.py tests bench

clean: ## remove the venv, builds and caches
	rm -rf $(VENV) dist build *.egg-info .pytest_cache
