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
        "Fixed", "IdempotencyKeyError", "KeyInProgress", "Limit", "LimitReached", "Permanent", "Retry", "RetryPolicy", "SafetyTask",
        "SafetynetError", "Snooze", "TaskSignal", "Transient", "__version__", "atomic", "breaker", "decide", "http_status",
        "is_network_error", "limit", "task",
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
        from tests.fixtures import tasks

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


# The supported modules and what each exposes: nothing more (a helper imported there is not API), nothing less.
PUBLIC_MODULES = {
    "safetynet.signals": [
        "announce", "announce_success", "breaker_changed", "breaker_refused", "consume", "dead_letter_quarantined",
        "dead_letter_recorded", "dead_letters_evicted", "drain_successes", "limit_deferred", "limit_paused",
        "stop_consuming", "task_dead", "task_ended", "task_replayed", "task_retrying",
    ],
    "safetynet.typing": [
        "Attempt", "Dead", "DeadLetterFacts", "Decision", "Done", "HistoryEntry", "Matcher", "Outcome", "Outgoing",
        "Plugin", "Reason", "Retry", "TaskEnded",
    ],
    "safetynet.deadletter": [
        "NOT_READ_BY_REPLAY", "REDACTED", "TRUNCATED", "Failure", "ReplayOutcome", "cap_fields", "cap_value", "discard",
        "enforce_cap", "fingerprint", "flush_spool", "give_up", "is_truncated", "normalise_message", "purge",
        "rebuild_failure_groups", "recount_failure_groups", "record", "replacement_arguments", "replay",
        "replay_refusal", "truncated_paths", "waiting_count",
    ],
    "safetynet.contrib.prometheus": [
        "ATTEMPTS", "BREAKER_CHANGES", "BREAKER_REFUSED", "DEAD", "DEAD_LETTERS_EVICTED", "RETRY_DELAY", "RUNTIME",
        "BreakerCollector", "DeadLetterCollector", "LIMIT_DEFERRALS", "LIMIT_PAUSES", "LIMIT_WAIT",
        "LIMIT_WAIT_BUCKETS", "LimitCollector", "PORT_ENVIRONMENT_VARIABLE", "RETRY_DELAY_BUCKETS",
        "RUNTIME_BUCKETS", "collector_registry", "flush", "install", "metrics_view", "multiprocess_dir", "on_breaker_changed",
        "on_breaker_refused", "on_dead_letters_evicted", "on_limit_deferred", "on_limit_paused", "on_task_ended", "on_task_retrying", "on_worker_ready",
        "start_worker_http_server", "uninstall", "worker_http_address",
    ],
    "safetynet.contrib.sentry": [
        "DECIDED_REASONS", "MIN_SECRET_LENGTH", "SafetynetIntegration", "dead_letter_fingerprint", "install",
        "redact_event", "uninstall",
    ],
}

# What a module may hold besides its API: imported modules, typing helpers, its logger.
_NOT_API = {"annotations", "logger", "TYPE_CHECKING", "Any", "ClassVar", "cast"}


def _public(module):
    """The public names a module defines (an object imported from elsewhere is its home module's API)."""
    import types

    found = []
    for name, value in vars(module).items():
        if name.startswith("_") or name in _NOT_API or isinstance(value, types.ModuleType):
            continue
        home = getattr(value, "__module__", None)
        if home is None or home == module.__name__ or home.startswith(module.__name__ + "."):
            found.append(name)
    return sorted(found)


def test_the_supported_modules_expose_exactly_their_api():
    import importlib

    for name, api in PUBLIC_MODULES.items():
        module = importlib.import_module(name)
        assert sorted(module.__all__) == sorted(api), name
        for attribute in api:
            assert getattr(module, attribute) is not None, (name, attribute)
        leaked = [attribute for attribute in _public(module) if attribute not in api]
        assert not leaked, f"{name} exposes names that are not its API: {leaked}"


def test_the_package_and_testing_expose_exactly_their_api_once_loaded():
    for module in (safetynet, safetynet.testing):
        for attribute in module.__all__:
            getattr(module, attribute)  # loads the lazy ones
        public = sorted(name for name in vars(module) if not name.startswith("_") and name not in _NOT_API
                        and not isinstance(vars(module)[name], type(safetynet)))
        assert public == sorted(set(module.__all__) - {"__version__"}), module.__name__


def test_the_package_is_typed():
    import pathlib

    assert (pathlib.Path(safetynet.__file__).parent / "py.typed").exists()
