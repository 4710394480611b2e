# sb3-offtrc developer tasks. `make help` lists them; README.md explains the two that matter.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Installed before anything else so that the resolver never replaces it with another build.
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for the torch step only (e.g. an --index-url for a CPU-only wheel index).
TORCH_PIP_ARGS ?=
SAFETY_GYMNASIUM_SPEC ?= safety-gymnasium==1.0.0
EXTRAS ?= safety,video,zoo,cluster,dev
# Headless rendering for Safety-Gymnasium (Mesa's EGL works without a display or GPU).
export MUJOCO_GL ?= egl
# Tests: one torch thread per pytest-xdist worker, so the workers do not oversubscribe the cores.
TEST_ENV := SB3_OFFTRC_REQUIRE_SAFETY=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

PYTEST_ARGS ?= -m "not slow" -n 2 --timeout=900 --durations=15
# The demo: the shipped OffTRC policy (demo/README.md says how it was trained), evaluated and filmed
# from above, then a short training run with the recommended preset (20k steps: a couple of minutes;
# its 1M-step results are in docs/benchmarks.md).
DEMO_MODEL ?= demo/offtrc_SafetyPointGoal1-v0.zip
DEMO_CHEETAH ?= demo/offtrc_HalfCheetahFlip-v4.zip
DEMO_ARGS ?= --algo offtrc --preset recommended --env SafetyPointGoal1-v0 --timesteps 20000 --progress-bar --out runs/demo/train

# The stamp's name carries a hash of everything that decides what gets installed, so `make setup`
# reinstalls after pyproject.toml, constraints.txt or one of the specs above changes, and is a
# no-op (seconds) otherwise.
SETUP_KEY := $(shell { cat pyproject.toml constraints.txt; echo '$(TORCH_SPEC) $(TORCH_PIP_ARGS) $(SAFETY_GYMNASIUM_SPEC) $(EXTRAS) $(PYTHON)'; } | sha256sum | cut -c1-16)
STAMP := $(VENV)/.sb3-offtrc-setup-$(SETUP_KEY)
DOCS_STAMP := $(VENV)/.sb3-offtrc-docs-$(SETUP_KEY)

.PHONY: help setup demo test test-slow test-all lint format docs bench clean

help: ## list the tasks
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-9s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: VENV=$(VENV) PYTHON=$(PYTHON) EXTRAS=$(EXTRAS) PYTEST_ARGS='$(PYTEST_ARGS)'"

setup: $(STAMP) ## create .venv and install torch, the package with its extras, and Safety-Gymnasium

$(STAMP):
	@if [ -d "$(VENV)" ] && ! ls "$(VENV)"/.sb3-offtrc-setup-* >/dev/null 2>&1 && [ -z "$${ADOPT_VENV:-}" ]; then \
	  echo "error: $(VENV) exists but was not made by 'make setup'; remove it, pick another VENV=..., or rerun with ADOPT_VENV=1 to install into it" >&2; \
	  exit 1; \
	fi
	@test -x "$(PY)" || { echo ">> creating $(VENV) with $(PYTHON)"; "$(PYTHON)" -m venv "$(VENV)"; }
	@echo ">> [1/4] $(TORCH_SPEC)"
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@echo ">> [2/4] sb3-offtrc[$(EXTRAS)] under constraints.txt"
	$(PIP) install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@echo ">> [3/4] $(SAFETY_GYMNASIUM_SPEC) without its unresolvable pins (see constraints.txt)"
	$(PIP) install --quiet --no-deps "$(SAFETY_GYMNASIUM_SPEC)"
	@echo ">> [4/4] checking that Safety-Gymnasium imports through sb3_offtrc.compat"
	$(PY) -c "from sb3_offtrc.compat import import_safety_gymnasium as f; import mujoco; f(); print('   mujoco', mujoco.__version__, '- ok')"
	@rm -f "$(VENV)"/.sb3-offtrc-setup-*
	@touch "$@"
	@echo ">> setup done: $(VENV)"

demo: setup ## evaluate and film the shipped OffTRC policies (SafetyPointGoal1-v0, HalfCheetahFlip), then train one briefly
	@$(PY) -c "import sb3_offtrc.cli" 2>/dev/null || { echo "error: the sb3_offtrc command line (sb3_offtrc/cli.py) is not available yet; nothing to run" >&2; exit 1; }
	$(PY) -m sb3_offtrc eval $(DEMO_MODEL) --algo offtrc --env SafetyPointGoal1-v0 --cost-limit 0.025 --episodes 5
	$(PY) -m sb3_offtrc record $(DEMO_MODEL) --algo offtrc --env SafetyPointGoal1-v0 --env-kwargs camera_name=fixedfar width=192 height=192 --steps 1000 --every 3 --fps 60 --output runs/demo/offtrc_SafetyPointGoal1-v0.gif
	$(PY) -m sb3_offtrc eval $(DEMO_CHEETAH) --algo offtrc --env OffTRC/HalfCheetahFlip-v4 --cost-limit 0.025 --episodes 5
	$(PY) -m sb3_offtrc record $(DEMO_CHEETAH) --algo offtrc --env OffTRC/HalfCheetahFlip-v4 --env-kwargs width=192 height=128 --steps 300 --every 2 --fps 10 --output runs/demo/offtrc_HalfCheetahFlip-v4.gif
	$(PY) -m sb3_offtrc train $(DEMO_ARGS)

test: setup ## run the test suite without the slow learning checks (what CI runs)
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup ## run only the slow learning checks (about a minute; CI runs them after `make test`)
	$(TEST_ENV) $(PY) -m pytest -m slow -n 2 --timeout=3600 --durations=10

test-all: setup ## run every test, the slow learning checks included
	$(TEST_ENV) $(PY) -m pytest -n 2 --timeout=3600 --durations=15

lint: setup ## ruff (lint + format check) and mypy on the package; runs all three, fails if any fails
	@status=0; \
	echo ">> ruff check ."; $(VENV)/bin/ruff check . || status=1; \
	echo ">> ruff format --check ."; $(VENV)/bin/ruff format --check . || status=1; \
	echo ">> mypy sb3_offtrc"; $(VENV)/bin/mypy sb3_offtrc || status=1; \
	exit $$status

format: setup ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

$(DOCS_STAMP): $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e ".[$(EXTRAS),docs]"
	@rm -f "$(VENV)"/.sb3-offtrc-docs-*
	@touch "$@"

docs: $(DOCS_STAMP) ## build the HTML docs into docs/_build/html (warnings are errors)
	$(VENV)/bin/sphinx-build -W -b html docs docs/_build/html
	@echo ">> docs: docs/_build/html/index.html"

bench: setup ## quick benchmark run, then the report
	$(PY) benchmarks/run.py --quick
	$(PY) benchmarks/report.py

clean: ## remove build outputs and caches (keeps .venv and runs/)
	rm -rf build dist docs/_build .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print -exec rm -rf {} +
