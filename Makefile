# The two commands a newcomer needs: `make demo` and `make test`. Both make .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The oldest supported Celery, for the second CI run.
CELERY_OLDEST ?= 5.5.3

.PHONY: demo test test-oldest lint docs services clean

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
	$(VENV)/bin/ruff check safetynet tests bench demo mkdocs_hooks.py
	$(VENV)/bin/mypy

# The docs site (mkdocs.yml): --strict makes a broken link, anchor or API reference fail the build.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: $(VENV)/.installed services lint docs
	$(PY) -m pytest $(PYTEST_ARGS)

test-oldest:
	$(MAKE) test VENV=.venv-celery-oldest EXTRA_PIP='celery[redis]==$(CELERY_OLDEST)'

clean:
	rm -rf $(VENV) .venv-celery-oldest demo/var .pytest_cache site
