#!/usr/bin/env python
"""manage.py for the test project (used by tests of the management command)."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import tests.celery_app  # noqa: F401
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
