"""Tasks the progress tests track."""

import safetynet
from safetynet import RetryPolicy


class ReportTooLarge(Exception):
    public_message = "Your report is too large; pick fewer months."


@safetynet.task(bind=True, progress_result=True)
def build_report(self, steps, card_token=None):
    for step in range(1, steps + 1):
        self.progress(step, steps, message=f"step {step} of {steps}")
    return {"rows": steps, "token": "tok_result_SECRET"}


@safetynet.task(bind=True, retry_policy=RetryPolicy(max_attempts=3, backoff=0, jitter="none"),
                retry_on=[ConnectionError])
def flaky_report(self, fail_times):
    self.progress(0, 2, message="starting")
    if self.attempt <= fail_times:
        raise ConnectionError("warehouse down")
    return self.attempt


@safetynet.task(bind=True)
def leaky_report(self, card_token=None):
    self.progress(1, 4, message="reading")
    raise ValueError(f"cannot parse row: card_token={card_token} password=hunter2")


@safetynet.task(bind=True)
def large_report(self):
    raise ReportTooLarge("36 months, 9 GB")


@safetynet.task(bind=True)
def untracked_report(self):
    self.progress(3, 10, message="on my own")
    return 1
