# `make run` and `make test` do all set-up themselves: a virtual environment in .venv with the
# pinned requirements (Python 3.11; set PYTHON=... to choose the interpreter).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-slow bench clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) quickstart.py

# The default test run (slow tests excluded). pytest's exit code 5 ("no tests collected")
# means the suite is broken here, so it fails.
test: $(STAMP)
	$(PY) -m pytest -q

# Long tests. Exit code 5 is fine here: there may be no slow test selected.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow; rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests selected"; exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) runs
