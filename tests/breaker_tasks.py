"""Tasks the breaker integration tests run in real worker processes (breaker "upstream", tests/settings.py)."""

import safetynet
from safetynet import Fixed, RetryPolicy
from tests.recording import client


def runs(name):
    """How many times the body of call ``name`` started (the upstream calls it made)."""
    return int(client().get(f"safetynet-tests:breaker-runs:{name}") or 0)


@safetynet.task(bind=True, breaker="upstream", retry_policy=RetryPolicy(max_attempts=2, backoff=Fixed(0.2),
                                                                         jitter="none"))
def call_upstream(self, name, fail):
    """Call the upstream: it fails (ConnectionError, counted by the breaker) or answers."""
    client().incr(f"safetynet-tests:breaker-runs:{name}")
    if fail:
        raise ConnectionError("upstream down")
    return {"attempt": self.attempt, "worker": self.request.hostname}
