# The two commands a newcomer needs: `make demo` and `make test`. Both make .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The oldest supported Celery, for the second CI run.
CELERY_OLDEST ?= 5.5.3

.PHONY: demo test test-oldest lint services clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' $(EXTRA_PIP)
	touch $@

demo: $(VENV)/.installed
	$(PY) demo/run.py

services:
	bash .ci/services.sh

lint: $(VENV)/.installed
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check safetynet tests bench demo
	$(VENV)/bin/mypy

test: $(VENV)/.installed services lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-oldest:
	$(MAKE) test VENV=.venv-celery-oldest EXTRA_PIP='celery[redis]==$(CELERY_OLDEST)'

clean:
	rm -rf $(VENV) .venv-celery-oldest demo/var .pytest_cache
