# The two commands a newcomer needs: `make demo` and `make test`. Both make .venv themselves, with the newest
# supported Python found on the machine (.ci/python says which; `make test PYTHON=python3.12` chooses).
PYTHON ?= $(shell .ci/python)
VENV ?= .venv
PY := $(VENV)/bin/python
# The oldest supported stack, for the second CI leg: Python 3.11, Django 5.2 with the django-tasks backport,
# Celery 5.5.3.
PYTHON_OLDEST ?= $(shell .ci/python 3.11)
OLDEST_PIP ?= 'Django==5.2.*' 'celery[redis]==5.5.3'

.PHONY: demo test test-oldest lint docs services clean

$(VENV)/.installed: pyproject.toml
	@python='$(PYTHON)'; test -n "$$python" || { echo "no Python to make $(VENV) with (.ci/python)" >&2; exit 1; }; \
	  echo "$$python -m venv $(VENV)"; "$$python" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev$(EXTRAS)]' $(EXTRA_PIP)
	@$(PY) -c 'import sys, django, celery; print(f"$(VENV): Python {sys.version.split()[0]}, Django {django.get_version()}, Celery {celery.__version__}")'
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
	$(MAKE) test VENV=.venv-oldest PYTHON='$(PYTHON_OLDEST)' EXTRAS=',django-tasks' EXTRA_PIP="$(OLDEST_PIP)"

clean:
	rm -rf $(VENV) .venv-oldest .venv-celery-oldest demo/var .pytest_cache site
