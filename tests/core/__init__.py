"""Unit tests of the pure decision core: no Django, no Celery worker, no I/O."""
