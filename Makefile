# Two entry points, each sets itself up on first use (creates .venv and installs):
#   make demo   train the default tiny model on the embedded synthetic data and print the results
#   make test   run the full test suite
#   make test-fast   the tests not marked slow (no subprocess trainings, no 2-process runs): the edit-test loop
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# torch builds known to install here; any torch in [2.9, 2.15) works (pyproject.toml pins the range)
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif
PYTEST_ARGS ?=
# the tests run single-threaded (tests/conftest.py): one pytest-xdist worker per core
TEST_WORKERS ?= 2

.PHONY: demo test test-fast install clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/amorlip train --config tiny-demo --train.name demo --train.resume auto

test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS) tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS) tests

clean-venv:
	rm -rf $(VENV)
