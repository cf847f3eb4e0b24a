"""``manage.py safetynet``, run as an operator runs it (a subprocess): its own output only, clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def manage(*arguments, **environment):
    return subprocess.run(
        [sys.executable, "tests/manage.py", "safetynet", *arguments], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT),
                          **environment},
    )


@pytest.mark.django_db(transaction=True)
def test_a_command_prints_only_its_own_output_though_checks_warn():
    from django.core import checks
    from django.db import connection

    assert any(issue.level == checks.WARNING for issue in checks.run_checks())  # the test tasks draw warnings
    done = manage("schedule", "list", "--json", SAFETYNET_TEST_DB=connection.settings_dict["NAME"])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout) == []


def test_a_check_that_fails_stops_the_command_and_shows_every_message():
    done = manage("schedule", "list", SAFETYNET_TEST_LOST_MESSAGE_SECONDS="86400")  # rows kept 1 day: too short
    assert done.returncode != 0 and done.stdout == ""
    assert "safetynet.E001" in done.stderr and "must be longer than LOST_MESSAGE_SECONDS (86400)" in done.stderr


def test_a_database_without_safetynets_tables_is_a_clear_error():
    done = manage("schedule", "list", SAFETYNET_TEST_DB="postgres")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "safetynet's tables are missing: run `manage.py migrate` first." in done.stderr
