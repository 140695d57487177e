# xai-workbench — every command a developer or CI runs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1

.PHONY: install up up-dist test test-slow test-gpu lint migrate proto bench clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || \
		{ echo "xai-workbench needs Python 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,inference,ray,triton,k8s]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the platform with dev tools

up: $(STAMP) ## the whole platform in one process on http://127.0.0.1:8000 (embedded)
	$(BIN)/wb up

up-dist: $(STAMP) ## each service its own process on PostgreSQL, Redis, NATS (distributed)
	$(BIN)/wb up-dist

migrate: $(STAMP)
	$(BIN)/wb migrate

test: $(STAMP) ## the fast suite (unit, integration against real servers, e2e in both modes)
	$(BIN)/pytest -m "not slow and not gpu" -q

test-slow: $(STAMP) ## slow tests (pytest's "no tests collected" counts as success)
	$(BIN)/pytest -m "slow and not gpu" -q; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-gpu: $(STAMP)
	$(BIN)/pytest -m gpu -q

lint: $(STAMP) ## ruff, mypy --strict on libs/, import-linter contracts
	$(BIN)/ruff check .
	$(BIN)/mypy --strict libs/workbench
	$(BIN)/lint-imports

proto: $(STAMP) ## rebuild proto/descriptors.binpb from proto/**/*.proto
	$(PY) scripts/gen_proto.py

bench: $(STAMP)
	$(PY) bench/gateway_overhead.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
