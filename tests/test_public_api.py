"""The public API is pinned: a change here is a deliberate change of the API."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import safetynet
import safetynet.testing


def test_public_names():
    assert sorted(safetynet.__all__) == sorted([
        "Breaker", "BreakerOpen", "CeleryBackoff", "ClaimLost", "ConfigurationError", "CrashLoop", "Dead", "Decision", "Done", "Exponential",
        "Fixed", "IdempotencyKeyError", "KeyInProgress", "Permanent", "Retry", "RetryPolicy", "SafetyTask",
        "SafetynetError", "Snooze", "TaskSignal", "Transient", "__version__", "atomic", "breaker", "decide", "http_status",
        "is_network_error", "task",
    ])
    for name in safetynet.__all__:
        assert getattr(safetynet, name) is not None


def test_testing_names():
    assert sorted(safetynet.testing.__all__) == sorted([
        "HTTPStatusError", "SimulatedAttempt", "Simulator", "Trace", "VirtualClock", "http_error", "inject",
        "simulate",
    ])


def test_pytest_plugin_is_registered_through_an_entry_point():
    assert "safetynet.testing.pytest_plugin" in {ep.value for ep in entry_points(group="pytest11")}


def test_users_test_suites_get_the_fixtures_with_no_configuration(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import os
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
        import tests.celery_app
        from tests import tasks

        def test_fixtures(simulate, virtual_clock, inject_fault):
            plan = inject_fault(tasks.call_api, times=1, exception=ConnectionError("x"))
            trace = simulate(tasks.call_api, 0)
            assert trace.delays == [2.0] and trace.result == 2 and plan.calls == 2
            assert virtual_clock.now() == virtual_clock.start
    """))
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:django", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
