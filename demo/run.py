#!/usr/bin/env python
"""The safetynet demo: the classic failing tasks, a payment and a shared limit on a real Celery worker, then a report.

Run it with ``make demo`` or ``python demo/run.py`` from anywhere. It needs no server:
Django's database, the Celery broker and the result backend are SQLite files in demo/var/
(set ``SAFETYNET_DEMO_REDIS_URL=redis://127.0.0.1:6379/3`` to use Redis instead).

What it does, top to bottom: start from an empty demo/var/, migrate, start a local SMTP
server and HTTP API that fail at first, start a worker process, send the tasks, wait until
each one has finished, stop the worker, and print what the worker recorded, attempt by attempt.
Exit status: 0 when every task ended as expected, 1 otherwise, 130 when interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).resolve().parent
VAR_DIR = Path(os.environ.get("SAFETYNET_DEMO_VAR") or DEMO_DIR / "var").resolve()  # as proj/settings.py
WORKER_LOG = VAR_DIR / "worker.log"
READY_FILE = VAR_DIR / "worker.ready"

#: Everything, from start to the last task's end, must happen within this many seconds.
RUN_TIMEOUT = 90.0
#: How long the worker gets to stop after SIGTERM before it is killed.
STOP_GRACE = 10.0

sys.path.insert(0, str(DEMO_DIR))
os.environ["DJANGO_SETTINGS_MODULE"] = "proj.settings"


class DemoError(Exception):
    """The demo could not run to the end; the message says why."""


@dataclass
class Case:
    """One task the demo sends, and what is known about it once it has run."""

    key: str
    title: str
    task_name: str
    args: tuple
    note: str = ""
    result: Any = None  # the AsyncResult
    sent_at: float = 0.0
    state: str = "PENDING"
    events: list = field(default_factory=list)

    @property
    def call(self) -> str:
        return f"{self.task_name.rsplit('.', 1)[-1]}({', '.join(map(repr, self.args))})"


CASES = [
    Case("a", "Welcome email: the SMTP server answers 421 twice, then accepts",
         "shop.tasks.send_welcome_email", ("ada@example.com",),
         note="from Celery's max_retries=3; each self.retry(countdown=2) sets its own delay"),
    Case("b", "API call: 429 with Retry-After: 2, then 200",
         "shop.tasks.fetch_exchange_rate", ("EUR",),
         note="as declared: retry_policy=RetryPolicy(...), retry_on=[http_status(429, 503)]"),
    Case("c", "Permanent error: the order does not exist",
         "shop.tasks.charge_order", (999,),
         note="no retry options: the project's SAFETYNET['DEFAULT_POLICY']"),
    Case("d", "Celery autoretry: the inventory service is down for good",
         "shop.tasks.sync_inventory", ("warehouse-7",),
         note="from Celery's retry_backoff=True, retry_backoff_max=4, max_retries=3 (autoretry_for=(ConnectionError,))"),
    Case("e", "Payment: the gateway charges, then answers too late; the retry must not charge again",
         "shop.tasks.pay_order", (1001, 4200),
         note="idempotency_key='pay-order-{order_id}', sent to the gateway as its Idempotency-Key"),
    Case("f", "The same payment sent again while (e) runs: a double click",
         "shop.tasks.pay_order", (1001, 4200),
         note="the same key: deferred while (e) holds it, then (e)'s stored result, the body not run"),
    Case("g", "Partner API: 429 with Retry-After: 3600; the retry waits in the database, then is brought forward",
         "shop.tasks.export_report", ("q3-sales",),
         note="retry_policy=RetryPolicy(max_attempts=3, backoff=60, max_delay=7200): a delay >= "
              "DURABLE_RETRY_SECONDS goes to the durable schedule"),
]
PAYMENT_KEY = "pay-order-1001"


class LongRetry:
    """Case (g): find its retry in the durable schedule, show it, and bring it forward as an operator would."""

    def __init__(self) -> None:
        self.case = next(case for case in CASES if case.key == "g")
        self.due_in = 0.0
        self.listing: list[str] = []
        self.brought_forward_at = 0.0

    def poll(self) -> None:
        from django.core.management import call_command
        from io import StringIO

        from safetynet.models import ScheduledMessage

        if self.brought_forward_at or self.case.result is None:
            return
        row = ScheduledMessage.objects.filter(task_id=self.case.result.id, state="scheduled").first()
        if row is None:
            return
        self.due_in = row.due_at - time.time()
        out = StringIO()
        call_command("safetynet", "schedule", "list", stdout=out)
        self.listing = out.getvalue().rstrip().splitlines()
        time.sleep(1.0)  # it waits in the database meanwhile: the worker holds no ETA message for it
        # The partner says it is back: `python manage.py safetynet schedule due-now --task shop.tasks.export_report`
        call_command("safetynet", "schedule", "due-now", "--task", self.case.task_name, stdout=StringIO())
        self.brought_forward_at = time.time()


LONG_RETRY = LongRetry()


def say(text: str = "") -> None:
    print(text, flush=True)


def tail(path: Path, lines: int = 30) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no worker log)"
    return "\n".join("    | " + line for line in content[-lines:]) or "    | (empty)"


def unused_port() -> int:
    """A local port nothing listens on (the inventory service that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the steps ------------------------------------------------------------------------------


def fresh_var_dir() -> None:
    shutil.rmtree(VAR_DIR, ignore_errors=True)
    VAR_DIR.mkdir(parents=True)


def set_up_django() -> None:
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)


def start_worker(app: Any) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DEMO_DIR), str(DEMO_DIR.parent), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["DEMO_PARENT_PID"] = str(os.getpid())  # the worker stops itself if this process dies
    command = [
        sys.executable, "-m", "celery", "-A", "proj", "worker", "--pool=threads", "--concurrency=4",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning",
        "-n", f"demo-{os.getpid()}@%h",
    ]
    log = WORKER_LOG.open("wb")
    try:
        return subprocess.Popen(command, cwd=DEMO_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    finally:
        log.close()  # the child has its own copy


def wait_until_ready(worker: subprocess.Popen, deadline: float) -> float:
    started = time.monotonic()
    while not READY_FILE.exists():
        code = worker.poll()
        if code is not None:
            raise DemoError(f"the Celery worker exited (status {code}) before it was ready. "
                            f"The end of {WORKER_LOG}:\n{tail(WORKER_LOG)}")
        if time.monotonic() > deadline:
            raise DemoError(f"the Celery worker was not ready after {time.monotonic() - started:.0f}s. "
                            f"The end of {WORKER_LOG}:\n{tail(WORKER_LOG)}")
        time.sleep(0.1)
    return time.monotonic() - started


def stop_worker(worker: subprocess.Popen) -> str:
    if worker.poll() is not None:
        return f"the worker had already exited (status {worker.returncode})"
    began = time.monotonic()
    worker.send_signal(signal.SIGTERM)  # warm shutdown: finish what runs, give the rest back
    try:
        worker.wait(timeout=STOP_GRACE)
        return f"stopped with SIGTERM in {time.monotonic() - began:.1f}s"
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        return f"did not stop within {STOP_GRACE:g}s of SIGTERM: killed"


def check_broker(app: Any) -> None:
    """Fail fast with a clear message when the broker cannot be reached (a Redis that is not running)."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5, timeout=3)
    except Exception as error:
        raise DemoError(f"cannot reach the Celery broker {app.conf.broker_url}: {error}") from None


def send_tasks(app: Any) -> None:
    for case in CASES:
        if case.key == "f":
            wait_for_claim(PAYMENT_KEY, time.monotonic() + 20)  # so that (e) is the one that charges
        case.sent_at = time.time()
        case.result = app.tasks[case.task_name].delay(*case.args)


def wait_for_claim(key: str, deadline: float) -> None:
    from safetynet.models import IdempotencyClaim

    # (f) must be sent once (e) holds the claim: its run has claimed the key, not merely been sent.
    while not IdempotencyClaim.objects.filter(key=key, state=IdempotencyClaim.State.IN_PROGRESS).exists():
        if time.monotonic() > deadline:
            raise DemoError(f"the payment task did not claim {key!r} in time. The end of {WORKER_LOG}:\n"
                            f"{tail(WORKER_LOG)}")
        time.sleep(0.05)


def wait_for_outcomes(deadline: float, started: float, long_retry: LongRetry) -> None:
    from celery import states

    while True:
        long_retry.poll()
        DJANGO_TASK.poll()
        for case in CASES:
            state = case.result.state
            if state != case.state:
                case.state = state
                say(f"  {time.time() - started:5.1f}s  ({case.key}) {case.call:<40} {state}")
        if all(case.state in states.READY_STATES for case in CASES):
            return
        if time.monotonic() > deadline:
            pending = ", ".join(f"({case.key}) {case.state}" for case in CASES if case.state not in states.READY_STATES)
            raise DemoError(f"timed out after {RUN_TIMEOUT:g}s waiting for the tasks to finish: {pending}. "
                            f"The end of {WORKER_LOG}:\n{tail(WORKER_LOG)}")
        time.sleep(0.25)


def collect_events(deadline: float) -> None:
    """Read what the worker recorded; the success event is written just after the result, so wait for it."""
    from shop.models import TaskEvent

    while True:
        for case in CASES:
            case.events = list(TaskEvent.objects.filter(task_id=case.result.id))
        missing = [case for case in CASES if not any(event.kind in ("success", "dead") for event in case.events)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise DemoError("the worker did not record a final event (task_success or task_dead) for: "
                            + ", ".join(f"({case.key}) {case.call}" for case in missing))
        time.sleep(0.2)


# -- (h) Django's tasks API --------------------------------------------------------------------


class DjangoTaskCase:
    """(h): a ``django.tasks`` task (``shop.tasks.book_courier``) run through safetynet's CeleryBackend, watched
    the way Django's docs say: ``result.refresh()`` until it is finished."""

    title = "django.tasks: @task book_courier, the courier's API drops the connection twice, then books"

    def __init__(self) -> None:
        self.result: Any = None
        self.seen: list[tuple[float, str, int, int]] = []  # (seconds after enqueue, status, attempts, errors)
        self.sent_at = 0.0

    @staticmethod
    def task() -> Any:
        """The task, or None when Django's tasks API is not installed (Django 5.2 without the backport)."""
        from shop import tasks

        return getattr(tasks, "book_courier", None)

    def enqueue(self) -> None:
        self.sent_at = time.time()
        self.result = self.task().enqueue("PX-7")
        self._note()

    def _note(self) -> None:
        state = (str(self.result.status), self.result.attempts, len(self.result.errors))
        if not self.seen or self.seen[-1][1:] != state:
            self.seen.append((time.time() - self.sent_at, *state))

    def poll(self) -> None:
        """Refresh the result while the other cases run (so its waits between attempts are seen)."""
        if self.result is not None and not self.result.is_finished:
            self.result.refresh()
            self._note()

    def wait(self, deadline: float) -> None:
        while not self.result.is_finished:
            if time.monotonic() > deadline:
                raise DemoError(f"(h) did not finish in time: {self.result.status}. The end of {WORKER_LOG}:\n"
                                f"{tail(WORKER_LOG)}")
            time.sleep(0.05)
            self.result.refresh()
            self._note()

    def report(self) -> list[str]:
        from safetynet.models import TaskRecord

        result = self.result
        say()
        say(f"(h) {self.title}")
        say(f"      book_courier.enqueue('PX-7')   result id {result.id}   (TASKS['default']: "
            "safetynet.tasks.CeleryBackend)")
        say("      result.refresh() saw:  " + ";  ".join(f"+{at:.2f}s {status} attempts={attempts} errors={errors}"
                                                      for at, status, attempts, errors in self.seen))
        for number, error in enumerate(result.errors, 1):
            last = error.traceback.strip().splitlines()[-1]
            say(f"      errors[{number - 1}]  attempt {number}: {error.exception_class_path}: {short(last, 70)}")
        value = result.return_value if result.status == "SUCCESSFUL" else "-"
        say(f"      outcome: {result.status}  attempts={result.attempts}  return_value={value}")
        say(f"      started_at +{(result.started_at.timestamp() - self.sent_at):.2f}s, last attempt "
            f"+{(result.last_attempted_at.timestamp() - self.sent_at):.2f}s, finished "
            f"+{(result.finished_at.timestamp() - self.sent_at):.2f}s; worker of each attempt: "
            f"{', '.join(sorted(set(result.worker_ids)))}")
        say("      on the dashboard and in `safetynet dead list` it is the Celery task "
            "django.tasks:shop.tasks.book_courier")
        problems = []
        statuses = [status for _, status, _, _ in self.seen]
        if result.status != "SUCCESSFUL":
            problems.append(f"(h) expected SUCCESSFUL, got {result.status}")
        if result.attempts != 3 or len(result.errors) != 2:
            problems.append(f"(h) expected 3 attempts and 2 errors, got {result.attempts} and {len(result.errors)}")
        if "SUCCESSFUL" in statuses[:-1] or not set(statuses[:-1]) <= {"READY", "RUNNING"}:
            problems.append(f"(h) expected READY/RUNNING while it waited, saw {statuses}")
        if result.return_value != {"parcel": "PX-7", "booked_on_attempt": 3} if result.status == "SUCCESSFUL" else 0:
            problems.append(f"(h) expected the third attempt to book, got {result.return_value}")
        if not TaskRecord.objects.filter(pk=result.id, status="SUCCESSFUL", attempts=3).exists():
            problems.append("(h) expected its TaskRecord row SUCCESSFUL with 3 attempts")
        return problems


DJANGO_TASK = DjangoTaskCase()


# -- (i) a limit shared by every worker --------------------------------------------------------------


class LimitedBatch:
    """(i): a dozen ``fetch_shipping_quote`` tasks sent at once through the limit "quotes-api" of the demo's
    settings (2 at once, 5 a second): the quotes API must never see more, and the tasks over the limit are
    deferred until their turn (snoozed, no attempt used), never failed."""

    title = "Limit: 12 shipping quotes sent at once through 'quotes-api' (2 at once, 5 a second, every worker)"
    task_name = "shop.tasks.fetch_shipping_quote"
    limit = "quotes-api"
    count = 12

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.sent_at = 0.0
        self.listing: list[str] = []
        self.events: list[Any] = []

    def send(self, app: Any) -> None:
        self.sent_at = time.time()
        self.results = [app.tasks[self.task_name].delay(f"PX-{number}") for number in range(1, self.count + 1)]

    def _look(self) -> None:
        """`safetynet limits list` once, while calls hold the limit's slots and others wait for their turn."""
        from io import StringIO

        from django.core.management import call_command

        from safetynet import limits

        state = limits.state_of(self.limit)
        if self.listing or not (state["in_use"] and state["waiting"]):
            return
        out = StringIO()
        call_command("safetynet", "limits", "list", stdout=out)
        self.listing = out.getvalue().rstrip().splitlines()

    def wait(self, deadline: float) -> None:
        from celery import states

        from shop.models import TaskEvent

        while not all(result.state in states.READY_STATES for result in self.results):
            if time.monotonic() > deadline:
                waiting = sum(result.state not in states.READY_STATES for result in self.results)
                raise DemoError(f"(i) {waiting} of {self.count} limited tasks did not finish in time. The end of "
                                f"{WORKER_LOG}:\n{tail(WORKER_LOG)}")
            self._look()
            time.sleep(0.05)
        ids = [result.id for result in self.results]
        while time.monotonic() < deadline + 10:  # the success events are written just after the results
            self.events = list(TaskEvent.objects.filter(task_id__in=ids).order_by("recorded_at"))
            if sum(event.kind == "success" for event in self.events) >= self.count:
                return
            time.sleep(0.2)

    def report(self, quotes: Any) -> list[str]:
        import re

        from safetynet import limits, shared
        from safetynet.models import DeadLetter

        config = limits.spec(self.limit)
        deferrals = [event for event in self.events if event.kind == "retrying"]
        reasons: dict[str, int] = {}
        for event in deferrals:
            found = re.search(r"reached \((\w+)\)", event.payload["exception"] or "")
            reason = found.group(1) if found else "?"
            reasons[reason] = reasons.get(reason, 0) + 1
        deferred_tasks = {event.task_id for event in deferrals}
        successes = [event for event in self.events if event.kind == "success"]
        states = [result.state for result in self.results]
        dead = DeadLetter.objects.filter(task_name=self.task_name).count()
        at_once, busiest = quotes.most_at_once(), quotes.busiest(1.0)
        client = shared.redis_client()
        say()
        say(f"(i) {self.title}")
        say(f"      fetch_shipping_quote('PX-1') … ('PX-{self.count}'), sent at once   "
            f"SAFETYNET['LIMITS']['{self.limit}']: {config.describe()}")
        say("      the limit's shared state lives in " + (
            "Redis (SAFETYNET_DEMO_REDIS_URL), one Lua script per check" if client is not None else
            "the database (LimitState rows in demo/var/demo.sqlite3, under a lock): no Redis is configured"))
        if self.listing:
            say("      `safetynet limits list` while they ran:")
            for line in self.listing:
                say(f"        {line}")
        say(f"      deferred {len(deferrals)} times (snooze, no attempt used; "
            + ", ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items()))
            + f"), {len(deferred_tasks)} of the {self.count} tasks at least once: each deferral published the task "
            "again for its turn")
        say(f"      outcome: {states.count('SUCCESS')} SUCCESS, each body run once, on attempt "
            f"{'/'.join(sorted({str(event.attempt) for event in successes})) or '-'}; {dead} dead letter(s)")
        if quotes.calls:
            first = min(started for started, *_ in quotes.calls)
            last = max(ended for _, ended, *_ in quotes.calls)
            say(f"      server side: {len(quotes.calls)} calls of {quotes.hold:g}s each, from +{first - self.sent_at:.2f}s "
                f"to +{last - self.sent_at:.2f}s; at most {at_once} in progress at once (limit "
                f"{config.concurrency}), at most {busiest} started in any second (limit {config.rate_count})")
        problems = []
        if states.count("SUCCESS") != self.count:
            problems.append(f"(i) expected {self.count} SUCCESS, got {', '.join(sorted(set(states)))}")
        if len(successes) != self.count or any(event.attempt != 1 for event in successes):
            problems.append("(i) expected each task to succeed on attempt 1 (a deferral uses no attempt)")
        if not deferrals or any(event.payload["entry"].get("action") != "snooze" for event in deferrals):
            problems.append("(i) expected the tasks over the limit to be deferred (snooze), and only deferred")
        if dead:
            problems.append(f"(i) expected no dead letter, got {dead}")
        if len(quotes.calls) != self.count:
            problems.append(f"(i) expected the quotes API to see {self.count} calls, it saw {len(quotes.calls)}")
        if at_once > (config.concurrency or 0):
            problems.append(f"(i) the quotes API saw {at_once} calls at once, over the limit's {config.concurrency}")
        if busiest > (config.rate_count or 0):
            problems.append(f"(i) the quotes API saw {busiest} calls start within a second, over the limit's "
                            f"{config.rate_count}")
        return problems


LIMITED = LimitedBatch()


# -- the report -----------------------------------------------------------------------------


def short(text: Any, width: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def outcome_of(case: Case) -> str:
    if case.state == "SUCCESS":
        return f"SUCCESS  returned {short(repr(case.result.result), 90)}"
    error = case.result.result
    return f"{case.state}  {type(error).__name__}: {short(error, 90)}"


def attempts_of(case: Case) -> list[dict]:
    """One row per attempt (and per deferral), in the order the worker recorded them."""
    rows: list[dict] = []
    for event in case.events:
        if event.kind == "retrying":
            rows.append(dict(event.payload["entry"]))
        elif event.kind == "dead" and event.payload["history"]:
            rows.append(dict(event.payload["history"][-1]))
        elif event.kind == "success":
            rows.append({
                "attempt": event.attempt, "started": event.payload["started"], "exception": None,
                "message": "", "action": "success", "delay": None, "reason": "", "result": event.payload["result"],
            })
    return rows


def print_attempts(case: Case) -> None:
    for row in attempts_of(case):
        at = f"+{row['started'] - case.sent_at:.2f}s" if row.get("started") else ""
        head = f"      attempt {row['attempt']}  {at:>7}  "
        pad = " " * len(head)
        if row["action"] == "success":
            say(f"{head}returned {short(row['result'], 80)}")
            say(f"{pad}decision: success")
            continue
        say(f"{head}raised {row['exception']}: {short(row['message'], 80)}")
        if row["action"] in ("retry", "snooze"):
            say(f"{pad}decision: {row['action']}, next attempt in {row['delay']:.2f}s  (rule: {row['reason']})")
        else:
            say(f"{pad}decision: dead ({row['reason']})")


def print_server_side(case: Case, smtp: Any, api: Any, inventory: str, gateway: Any, partner: Any) -> None:
    if case.key == "f":
        say(f"      ledger rows written by (f): {ledger_rows(1001, case.result.id)}; it did not call the gateway")
        return
    if case.key == "e":
        seen = [(when, what) for when, key, what in gateway.events if key == PAYMENT_KEY]
        say(f"      ledger: {ledger_rows(1001)} row(s) for order 1001; gateway: {len(gateway.charges)} charge(s)")
    elif case.key == "a":
        seen = [(when, what) for when, recipient, what in smtp.events if recipient == case.args[0]]
    elif case.key == "b":
        seen = [(when, f"{request} -> {what}") for when, request, what in api.events]
    elif case.key == "d":
        say(f"      server side: nothing listens on {inventory} (connection refused)")
        return
    elif case.key == "g":
        seen = [(when, f"{request} -> {what}") for when, request, what in partner.events]
        retry = LONG_RETRY
        say(f"      the retry waited in the database (due in {retry.due_in / 60:.0f} min), not in the worker; "
            "`safetynet schedule list` showed:")
        for line in retry.listing:
            say(f"        {line}")
        say(f"      brought forward at +{retry.brought_forward_at - case.sent_at:.2f}s "
            "(`safetynet schedule due-now --task shop.tasks.export_report`); the worker's relay published it")
    else:
        return
    say("      server side: " + "; ".join(f"+{when - case.sent_at:.2f}s {what}" for when, what in seen))


def ledger_rows(order_id: int, task_id: str | None = None) -> int:
    from shop.models import Payment

    rows = Payment.objects.filter(order_id=order_id)
    return (rows.filter(task_id=task_id) if task_id else rows).count()


def check(case: Case, gateway: Any = None) -> list[str]:
    """What should have happened; a failed expectation is a problem with safetynet or the demo."""
    rows = attempts_of(case)
    actions = [row["action"] for row in rows]
    dead = next((event for event in case.events if event.kind == "dead"), None)
    retrying = [event.payload["entry"]["attempt"] for event in case.events if event.kind == "retrying"]
    problems = []

    def expect(condition: bool, text: str) -> None:
        if not condition:
            problems.append(text)

    if case.key == "a":
        expect(case.state == "SUCCESS", f"expected SUCCESS, got {case.state}")
        expect(actions == ["retry", "retry", "success"], f"expected retry, retry, success; got {actions}")
        expect(all(row["delay"] == 2 for row in rows[:2]), "expected the countdown=2 of self.retry as each delay")
    elif case.key == "b":
        expect(case.state == "SUCCESS", f"expected SUCCESS, got {case.state}")
        expect(actions == ["retry", "success"], f"expected retry, success; got {actions}")
        expect(bool(rows) and (rows[0]["delay"] or 0) >= 2, "expected a delay of at least Retry-After: 2")
    elif case.key == "c":
        expect(case.state == "FAILURE", f"expected FAILURE, got {case.state}")
        expect(actions == ["dead"], f"expected one attempt, given up; got {actions}")
        expect(dead is not None and dead.payload["reason"] == "permanent_error", "expected reason permanent_error")
        expect(type(case.result.result).__name__ == "Permanent", "expected the task to fail with Permanent")
    elif case.key == "d":
        expect(case.state == "FAILURE", f"expected FAILURE, got {case.state}")
        expect(actions == ["retry", "retry", "retry", "dead"], f"expected 3 retries then dead; got {actions}")
        expect(dead is not None and dead.payload["reason"] == "retries_exhausted", "expected reason retries_exhausted")
        expect(all(0 <= row["delay"] <= 4 for row in rows[:3]), "expected delays within retry_backoff_max=4")
        expect(isinstance(case.result.result, ConnectionError),
               f"expected the original ConnectionError to fail the task, got {type(case.result.result).__name__}")
    elif case.key == "e":
        expect(case.state == "SUCCESS", f"expected SUCCESS, got {case.state}")
        expect(actions == ["retry", "success"], f"expected retry (the timeout), success; got {actions}")
        expect(bool(rows) and "Timeout" in str(rows[0]["exception"]), "expected the first attempt to time out")
        expect(gateway is not None and len(gateway.charges) == 1, "expected the gateway to charge once")
        expect(ledger_rows(1001) == 1, f"expected one ledger row for order 1001, got {ledger_rows(1001)}")
    elif case.key == "f":
        first = next(other for other in CASES if other.key == "e")
        expect(case.state == "SUCCESS", f"expected SUCCESS, got {case.state}")
        expect(bool(actions) and set(actions[:-1]) == {"snooze"} and actions[-1] == "success",
               f"expected deferrals (snooze) then success; got {actions}")
        expect(case.result.result == first.result.result, "expected (e)'s stored result")
        expect(ledger_rows(1001, case.result.id) == 0, "expected (f) to write no ledger row")
        expect(len(gateway.events) == 2 if gateway is not None else False,
               "expected the gateway to see (e)'s two requests only")
    elif case.key == "g":
        from safetynet.models import ScheduledMessage

        scheduled = ScheduledMessage.objects.filter(task_id=case.result.id).first()
        expect(case.state == "SUCCESS", f"expected SUCCESS, got {case.state}")
        expect(actions == ["retry", "success"], f"expected retry (Retry-After: 3600), success; got {actions}")
        expect(bool(rows) and (rows[0]["delay"] or 0) >= 3600, "expected a delay of at least Retry-After: 3600")
        expect(scheduled is not None and scheduled.kind == "retry" and scheduled.state == "consumed"
               and scheduled.publishes == 1, "expected one durable-schedule row, published once and consumed")
        started = rows[-1].get("started") if rows else None
        expect(bool(started) and 0 <= started - LONG_RETRY.brought_forward_at <= 1.5,
               "expected the relay to publish the retry within 1.5s of it being due")
    if dead is not None:
        history = [entry["attempt"] for entry in dead.payload["history"]]
        expect(history == [*retrying, history[-1]] if history else False,
               f"task_dead history {history} does not match the task_retrying events {retrying}")
    return problems


def report(app: Any, smtp: Any, api: Any, inventory: str, gateway: Any, partner: Any, quotes: Any,
           timings: dict[str, str]) -> list[str]:
    from celery import __version__ as celery_version

    import safetynet

    broker = app.conf.broker_url
    say()
    say("=" * 100)
    say(f"safetynet {safetynet.__version__} demo report   (celery {celery_version}, one worker process, "
        "pool=threads, concurrency=4)")
    say(f"  broker:  {broker}")
    say(f"  results: {app.conf.result_backend}")
    say(f"  worker:  ready in {timings['ready']}, {timings['stop']}; its log is {WORKER_LOG}")
    say()
    say("Policies  (task.policy.describe())")
    for case in CASES:
        task = app.tasks[case.task_name]
        say(f"  ({case.key}) {case.task_name:<31} {task.policy.describe()}")
        say(f"        {case.note}")
    problems: list[str] = []
    for case in CASES:
        say()
        say(f"({case.key}) {case.title}")
        say(f"      {case.call}   task id {case.result.id}")
        print_attempts(case)
        dead = next((event for event in case.events if event.kind == "dead"), None)
        outcome = outcome_of(case)
        if dead is not None:
            outcome += f"\n      given up: {dead.payload['reason']} ({dead.payload['detail']})"
        say(f"      outcome: {outcome}")
        print_server_side(case, smtp, api, inventory, gateway, partner)
        problems += [f"({case.key}) {problem}" for problem in check(case, gateway)]
    if DJANGO_TASK.result is not None:
        problems += DJANGO_TASK.report()
    else:
        say()
        say("(h) django.tasks: skipped (Django's tasks API is not installed: Django 6, or the django-tasks backport)")
    problems += LIMITED.report(quotes)
    say()
    say("Times are seconds after the task was sent; attempts, raised exceptions, decisions and delays were recorded")
    say("in the worker by receivers of safetynet.signals.task_retrying / task_dead and celery's task_success.")
    say("=" * 100)
    return problems


# -- main -----------------------------------------------------------------------------------


#: The batch that fills the dashboard: (task, arguments) in the order sent.
MIX = ([("shop.tasks.sync_catalog", (n,)) for n in range(40)] + [("shop.tasks.notify_customer", (n,)) for n in range(30)]
       + [("shop.tasks.import_row", (n,)) for n in range(1, 29)]
       + [("shop.tasks.refresh_partner_feed", (name,)) for name in ("acme", "globex", "initech")])
#: The demo's users (made by every run): staff see the dashboard, the shopper only the reports.
USERS = {"staff": "safetynet-demo", "shopper": "safetynet-demo"}


def send_mix(app: Any, deadline: float) -> dict[str, int]:
    """A realistic batch for the dashboard: chores that work, mails retried once, bad rows, a partner feed down."""
    from celery import states

    results = [app.send_task(name, args) for name, args in MIX]
    while time.monotonic() < deadline:
        if all(result.state in states.READY_STATES for result in results):
            break
        time.sleep(0.3)
    else:
        raise DemoError(f"the dashboard's batch of {len(MIX)} tasks did not finish in time; see {WORKER_LOG}")
    counted: dict[str, int] = {}
    for result in results:
        counted[result.state] = counted.get(result.state, 0) + 1
    return counted


#: Exports the partner's API refuses for an hour (429, Retry-After: 3600): they wait on the durable schedule.
WAITING_EXPORTS = ("weekly-north", "weekly-south")


def fill_the_schedule(app: Any, deadline: float) -> int:
    """Two exports that come back in an hour: the dashboard's schedule page shows them waiting."""
    from safetynet.models import ScheduledMessage

    ids = [app.send_task("shop.tasks.export_report", (name,)).id for name in WAITING_EXPORTS]
    while time.monotonic() < deadline:
        waiting = ScheduledMessage.objects.filter(task_id__in=ids, state=ScheduledMessage.State.SCHEDULED).count()
        if waiting == len(ids):
            return waiting
        time.sleep(0.3)
    raise DemoError(f"the exports {', '.join(WAITING_EXPORTS)} did not reach the durable schedule; see {WORKER_LOG}")


def exercise_breakers() -> dict[str, str]:
    """Calls through the two declared breakers, as the shop's code would: the partner's API fails (its breaker
    opens), the payment gateway answers (its breaker stays closed)."""
    import safetynet
    from safetynet import breakers

    for _ in range(6):
        try:
            with safetynet.breaker("partner-api"):
                raise ConnectionError("partner API: connection refused")
        except (ConnectionError, safetynet.BreakerOpen):
            pass
    for _ in range(12):
        with safetynet.breaker("payment-gateway"):
            pass
    return {name: breakers.state_of(name)["state"] for name in ("partner-api", "payment-gateway")}


#: The made-up day before the run: (task, runs an hour at the quiet time, its typical run time in seconds).
HISTORY = (("shop.tasks.sync_catalog", 120, 0.04), ("shop.tasks.notify_customer", 80, 0.25),
           ("shop.tasks.import_row", 60, 0.012), ("shop.tasks.send_welcome_email", 20, 0.6),
           ("shop.tasks.fetch_exchange_rate", 30, 0.15))


def make_up_history() -> int:
    """A day of counts before the run (hour rows) and an hour of minute rows, so the charts show a shape.

    Only successes, retries and run times are made up, never tasks given up: every "given up" figure
    on the dashboard links to dead letters that exist. The minutes and the hour of this run keep their
    real counts (a made-up row never replaces one the worker wrote).
    """
    import bisect
    import math
    from datetime import datetime, timedelta, timezone

    from safetynet.models import TaskStats
    from safetynet.stats import RUNTIME_BUCKETS

    now = datetime.now(tz=timezone.utc)
    hour = now.replace(minute=0, second=0, microsecond=0)
    minute = now.replace(second=0, microsecond=0)
    rows = []

    def row(period: int, start: datetime, task: str, runs: int, typical: float, busy: float) -> TaskStats:
        retries = round(runs * (0.02 + 0.05 * busy))
        histogram = [0] * len(RUNTIME_BUCKETS)
        slow = round(runs * (0.04 + 0.1 * busy))  # the slow tail grows when busy
        histogram[bisect.bisect_left(RUNTIME_BUCKETS, typical)] += runs - slow
        histogram[bisect.bisect_left(RUNTIME_BUCKETS, typical * (3 + 4 * busy))] += slow
        return TaskStats(period=period, start=start, task_name=task, runs=runs, successes=runs - retries,
                         retries=retries, snoozes=0, dead=0, dead_by_reason={},
                         runtime_sum=runs * typical * (1 + busy), runtime_buckets=histogram)

    for back in range(1, 24):
        start = hour - timedelta(hours=back)
        busy = (1 + math.sin(2 * math.pi * (start.hour - 9) / 24)) / 2  # busiest mid-afternoon UTC
        for index, (task, quiet, typical) in enumerate(HISTORY):
            runs = round(quiet * (1 + 3 * busy) * (1 + 0.15 * math.sin(back * 1.7 + index)))
            rows.append(row(TaskStats.HOUR, start, task, runs, typical, busy))
    for back in range(3, 60):
        start = minute - timedelta(minutes=back)
        busy = (1 + math.sin(back / 6)) / 2
        for index, (task, quiet, typical) in enumerate(HISTORY):
            runs = max(0, round(quiet / 60 * (1 + 3 * busy) * (1 + 0.4 * math.sin(back * 2.3 + index))))
            if runs:
                rows.append(row(TaskStats.MINUTE, start, task, runs, typical, busy))
    TaskStats.objects.bulk_create(rows, ignore_conflicts=True)
    return len(rows)


def make_users() -> None:
    from django.contrib.auth.models import User

    for name, password in USERS.items():
        if name == "staff":
            User.objects.create_superuser(name, f"{name}@shop.example", password)
        else:
            User.objects.create_user(name, f"{name}@shop.example", password)


def point_to_the_dashboard(mix: dict[str, int]) -> None:
    from safetynet.models import DeadLetter

    say(f"\nThe dashboard: {sum(mix.values())} more tasks ran for it ({', '.join(f'{count} {state}' for state, count in sorted(mix.items()))}); "
        f"{DeadLetter.objects.dead().count()} dead letters wait. See it, with a worker, live:")
    say("    .venv/bin/python demo/serve.py        # then open http://127.0.0.1:8000/safetynet/")
    say(f"  log in as staff / {USERS['staff']} (the dashboard) or shopper / {USERS['shopper']} "
        "(http://127.0.0.1:8000/reports/: a report with a progress bar). The partner feed is back up now:")
    say("  replay a shop.tasks.refresh_partner_feed dead letter and watch it succeed.")


def main() -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    started_wall = time.time()
    deadline = time.monotonic() + RUN_TIMEOUT
    redis_url = os.environ.get("SAFETYNET_DEMO_REDIS_URL", "").strip()
    say(f"safetynet demo: broker and results on {'Redis ' + redis_url if redis_url else 'SQLite files in demo/var/'}")

    fresh_var_dir()
    from stubs import PaymentGateway, QuotesAPI, RateLimitedAPI, SMTPStub

    smtp = SMTPStub(refusals=2).start()
    api = RateLimitedAPI(retry_after=2).start()
    gateway = PaymentGateway(stall_seconds=2).start()
    partner = RateLimitedAPI(retry_after=3600).start()
    quotes = QuotesAPI(hold=0.1).start()
    inventory = f"127.0.0.1:{unused_port()}"
    os.environ["DEMO_SMTP_PORT"] = str(smtp.port)
    os.environ["DEMO_API_URL"] = api.url
    os.environ["DEMO_INVENTORY_ADDRESS"] = inventory
    os.environ["DEMO_GATEWAY_URL"] = gateway.url
    os.environ["DEMO_PARTNER_URL"] = partner.url
    os.environ["DEMO_QUOTES_URL"] = quotes.url
    say(f"  SMTP stub on 127.0.0.1:{smtp.port}, API stub on {api.url}, payment gateway on {gateway.url}, "
        f"inventory service (down) at {inventory}, partner API on {partner.url}, quotes API on {quotes.url}")

    set_up_django()
    from django.core import checks

    from proj.celery import app

    app.loader.import_default_modules()
    issues = checks.run_checks(tags=["safetynet"])
    say(f"  migrated demo/var/demo.sqlite3; safetynet system checks: {len(issues) or 'no'} issue(s)")
    for issue in issues:
        say(f"    {issue}")
    check_broker(app)
    purged = app.control.purge()  # a Redis database may hold messages of an interrupted run
    if purged:
        say(f"  purged {purged} message(s) left in the queue by an earlier run")

    worker = start_worker(app)
    timings: dict[str, str] = {}
    try:
        say(f"  started a Celery worker (pid {worker.pid}), waiting until it is ready…")
        timings["ready"] = f"{wait_until_ready(worker, deadline):.1f}s"
        say(f"  sending {len(CASES)} tasks; their states as the result backend reports them (seconds since start):")
        send_tasks(app)
        if DjangoTaskCase.task() is not None:
            DJANGO_TASK.enqueue()
        wait_for_outcomes(deadline, started_wall, LONG_RETRY)
        if DJANGO_TASK.result is not None:
            DJANGO_TASK.wait(deadline)
            say(f"  {time.time() - started_wall:5.1f}s  (h) book_courier.enqueue('PX-7')"
                f"{'':<13} {DJANGO_TASK.result.status} (django.tasks)")
        collect_events(deadline + 10)
        say(f"  sending {LIMITED.count} shipping quotes at once through the limit {LIMITED.limit!r}…")
        LIMITED.send(app)
        LIMITED.wait(deadline)
        say(f"  {time.time() - started_wall:5.1f}s  (i) {LIMITED.count} x fetch_shipping_quote{'':<16} "
            + ", ".join(sorted({result.state for result in LIMITED.results})))
        say(f"  sending {len(MIX)} more tasks for the dashboard…")
        mix = send_mix(app, deadline)
        waiting = fill_the_schedule(app, deadline)
        say(f"  {waiting} exports the partner refuses for an hour wait on the durable schedule")
    finally:
        timings["stop"] = stop_worker(worker)
        smtp.stop()
        api.stop()
        gateway.stop()
        partner.stop()
        quotes.stop()
    problems = report(app, smtp, api, inventory, gateway, partner, quotes, timings)
    make_users()
    states = exercise_breakers()
    made_up = make_up_history()
    say(f"  breakers: {', '.join(f'{name} {state}' for name, state in states.items())}; the charts' past day is "
        f"made up by the demo ({made_up} rows of successes, retries and run times; the last minutes are this run's)")
    from shop.tasks import partner_feed_flag

    partner_feed_flag().touch()
    point_to_the_dashboard(mix)
    total = time.time() - started_wall
    if problems:
        say(f"\nUNEXPECTED ({len(problems)}), the demo failed after {total:.1f}s:")
        for problem in problems:
            say(f"  - {problem}")
        return 1
    say(f"All {len(CASES) + (DJANGO_TASK.result is not None) + 1} cases ({len(CASES) + (DJANGO_TASK.result is not None)}"
        f" tasks and {LIMITED.count} through a limit) ended as expected in {total:.1f}s.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DemoError as error:
        print(f"\ndemo FAILED: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ndemo interrupted; the worker was stopped.", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"\ndemo FAILED with an unexpected error (above); the worker log is {WORKER_LOG}",
              file=sys.stderr, flush=True)
        sys.exit(1)
