"""What the test worker processes tell the tests, through the real Redis of the machine."""

import json
import os

import redis

from safetynet import signals

URL = os.environ.get("SAFETYNET_TEST_RECORD_URL", "redis://127.0.0.1:6379/14")


def client():
    return redis.Redis.from_url(URL)


def record(kind, task_id, value):
    """Append ``value`` to the list ``kind:task_id``."""
    client().rpush(f"safetynet-tests:{kind}:{task_id}", json.dumps(value, default=str))


def read(kind, task_id):
    return [json.loads(item) for item in client().lrange(f"safetynet-tests:{kind}:{task_id}", 0, -1)]


def _on_dead(sender, task_id=None, history=None, reason=None, **kwargs):
    record("dead", task_id, {"reason": reason, "history": history})


def _on_retrying(sender, task_id=None, entry=None, **kwargs):
    record("retrying", task_id, entry)


def connect():
    """Record every safetynet decision (called in the worker processes)."""
    signals.task_dead.connect(_on_dead, dispatch_uid="tests.recording.dead")
    signals.task_retrying.connect(_on_retrying, dispatch_uid="tests.recording.retrying")
