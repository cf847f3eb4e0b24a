"""Whatever a broker message holds, a real worker keeps serving and the message ends exactly once.

Hypothesis generates the messages (bodies, headers, content types and encodings, compression, task
names registered or not); they are published raw with kombu to the queue of one real prefork worker
per broker (Redis and RabbitMQ), in one batch, and the test checks that the worker never exits, that
each message ended as exactly one run (counted by task id, in Redis, by the task itself) or exactly
one dead letter (found by a marker header), that well-formed messages ran, and that nothing is left
in the queue.

Outside the property, as Celery means them: a message whose ``expires`` has passed is revoked, one
whose ``eta`` is in the future waits for it, and a tiny ``timelimit`` kills a run (a dead letter after
the run counted): the generators give those fields only values that are invalid, past (eta), far
ahead (expires) or long (time limits).

``SAFETYNET_TEST_MESSAGES`` sets how many messages per broker (default 500),
``SAFETYNET_TEST_MESSAGES_SEED`` the Hypothesis seed (default: a fixed one). A failure prints each
message that did not end exactly once.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Producer, Queue

from tests.fixtures import message_tasks, recording
from tests.integration.conftest import Worker, configure_app, release_app

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

COUNT = int(os.environ.get("SAFETYNET_TEST_MESSAGES", "500"))
SEED = int(os.environ.get("SAFETYNET_TEST_MESSAGES_SEED", "20261205"))

REDIS_BROKER = os.environ.get("SAFETYNET_TEST_BROKER", "redis://127.0.0.1:6379/15")
if not REDIS_BROKER.startswith("redis"):
    REDIS_BROKER = "redis://127.0.0.1:6379/15"
BACKEND = os.environ.get("SAFETYNET_TEST_BACKEND", "redis://127.0.0.1:6379/14")
AMQP_BROKER = os.environ.get("SAFETYNET_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {"redis": REDIS_BROKER, "rabbitmq": AMQP_BROKER}

SINK, STRICT, PLAIN = message_tasks.sink.name, message_tasks.strict.name, message_tasks.plain_sink.name
REGISTERED = (SINK, STRICT, PLAIN)
MARKER = "msgs_case"

# -- what a message may hold --------------------------------------------------------------------

texts = st.text(max_size=24)
leaves = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)
          | st.floats(allow_nan=False, allow_infinity=False) | texts)
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=10)
names = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
embeds = st.sampled_from([None, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]) | st.one_of(
    st.dictionaries(st.sampled_from(["callbacks", "errbacks", "chain", "chord", "id", "get", "_protected", "x"]),
                    json_values, min_size=1, max_size=3),
    st.fixed_dictionaries({"callbacks": st.lists(st.fixed_dictionaries({"task": texts, "args": json_values}),
                                                 min_size=1, max_size=2)}),
    json_values,
)
# Text Celery cannot read as a date (no digit first): a past or future date is chosen on purpose below.
not_dates = st.text(max_size=20).filter(lambda text: not text[:1].isdigit()) | json_values.filter(
    lambda value: not isinstance(value, str))
CELERY_FIELDS = {
    "lang": texts | json_values, "shadow": texts | json_values, "root_id": texts | json_values,
    "parent_id": texts | json_values, "group": texts | json_values, "group_index": json_values,
    "retries": st.integers(min_value=0, max_value=2 ** 40) | json_values,
    "eta": st.just("2001-02-03T04:05:06+00:00") | not_dates,
    "expires": st.just("2999-01-01T00:00:00+00:00") | not_dates,
    "timelimit": st.sampled_from([None, [None, None], [600, 300], [-1, None], [1, 2, 3], "60"]) | json_values.filter(
        lambda value: not (isinstance(value, list) and len(value) == 2)),
    "argsrepr": texts | json_values, "kwargsrepr": texts | json_values, "origin": texts | json_values,
    "ignore_result": json_values, "stamped_headers": json_values, "stamps": json_values,
    "replaced_task_nesting": json_values, "headers": json_values, "utc": json_values,
    "callbacks": json_values, "chord": json_values, "chain": json_values,
    "get": json_values, "update": json_values, "_protected": json_values,
    # safetynet's own headers, mangled
    "safetynet": json_values | st.fixed_dictionaries({"attempt": json_values, "started_at": json_values,
                                                      "history": json_values}),
    "safetynet_relayed": json_values, "safetynet_claim": json_values, "safetynet_progress": json_values,
    "safetynet_replay_of": json_values,
    "compression": st.sampled_from(["zlib", "bogus", ""]) | json_values,
}
header_changes = st.dictionaries(st.sampled_from(sorted(CELERY_FIELDS)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({key: CELERY_FIELDS[key] for key in keys}))
extra_headers = st.dictionaries(texts.filter(lambda key: key not in CELERY_FIELDS and key not in ("task", "id")),
                                json_values, max_size=3)

task_names = (st.sampled_from(REGISTERED) | st.sampled_from(["tests.fixtures.message_tasks.missing", ""])
              | texts | json_values)
ids = st.sampled_from(["valid"] * 6 + ["missing"]) | json_values
content_types = st.sampled_from(["application/json"] * 8 + [
    "application/x-yaml", "application/x-python-serialize", "application/x-msgpack", "text/plain", "",
]) | texts
content_encodings = st.sampled_from(["utf-8"] * 8 + ["binary", "latin-1", "rot13", ""]) | texts


@dataclass
class Case:
    """One message, before it is given its id and marker."""

    kind: str
    task: Any
    body: bytes
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    id_kind: Any = "valid"
    changes: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    protocol1: bool = False
    compress: bool = False
    #: Built as Celery sends a task (a registered name, arguments and nothing else changed): it must run.
    well_formed: bool = False


def _dump(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def cases(draw: Any) -> Case:
    kind = draw(st.sampled_from(["valid"] * 12 + ["json"] * 3 + ["near"] * 3 + ["bytes"] * 2 + ["protocol1"] * 2
                                + ["encoded"] * 3 + ["huge"]))
    task = draw(task_names)
    if kind == "valid":
        args, kwargs = draw(st.lists(json_values, max_size=3)), draw(st.dictionaries(names, json_values, max_size=3))
        if draw(st.booleans()):  # mostly clean: the other variations apply to a third of them
            return Case("valid", draw(st.sampled_from(REGISTERED)), _dump([args, kwargs, None]), well_formed=True)
        return Case("valid", task, _dump([args, kwargs, draw(embeds)]), id_kind=draw(ids), changes=draw(header_changes),
                    extra=draw(extra_headers))
    if kind == "json":
        body = _dump(draw(json_values | st.just("just a string")))
    elif kind == "near":
        body = _dump(draw(st.lists(json_values, min_size=0, max_size=5)))
    elif kind == "bytes":
        body = draw(st.binary(max_size=64))
    elif kind == "protocol1":
        fields = {"task": task, "id": str(uuid.uuid4()), "args": draw(json_values), "kwargs": draw(json_values)}
        fields.update(draw(header_changes))
        return Case("protocol1", task, _dump(fields), protocol1=True)
    elif kind == "encoded":
        body = _dump([draw(st.lists(json_values, max_size=2)), {}, None])
        return Case("encoded", draw(st.sampled_from(REGISTERED)), body, content_type=draw(content_types),
                    content_encoding=draw(content_encodings), compress=draw(st.booleans()))
    else:  # huge
        body = draw(st.sampled_from([
            _dump([["x" * 1_000_000], {}, None]),  # a 1 MB argument: a run
            b"[" * 5000 + b"]" * 5000,  # nested deeper than the decoder goes
            _dump({"k%d" % n: n for n in range(50_000)}),
            # 10,000 arguments and callbacks (recording such a message takes the main process about 0.6 s)
            _dump([list(range(10_000)), {}, {"callbacks": [{"task": "x"}] * 20}]),
        ]))
    return Case(kind, task, body, id_kind=draw(ids), changes=draw(header_changes), extra=draw(extra_headers))


def generate(count: int) -> list[Case]:
    """``count`` messages drawn by Hypothesis (its generation phase only: the check is made on the batch)."""
    drawn: list[Case] = []

    @seed(SEED)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def collect(case: Case) -> None:
        drawn.append(case)

    while len(drawn) < count:
        collect()
    return drawn[:count]


# -- publishing and counting --------------------------------------------------------------------

def publish(broker: str, queue: str, token: str, batch: list[Case]) -> dict[int, str | None]:
    """Publish the batch raw; return {case index: the task id a run is counted under, or None}."""
    run_ids: dict[int, str | None] = {}
    with Connection(broker) as connection:
        producer = Producer(connection)
        for index, case in enumerate(batch):
            task_id = str(uuid.uuid4())
            headers: dict[Any, Any] = {"lang": "py", "task": case.task, "id": task_id, "retries": 0,
                                       "root_id": task_id, "parent_id": None, "group": None, "eta": None,
                                       "expires": None, "timelimit": [None, None], "argsrepr": "",
                                       "kwargsrepr": "", "origin": "test"}
            if case.protocol1:
                headers = {}
                task_id = json.loads(case.body)["id"]
            elif case.id_kind == "missing":
                del headers["id"]
            elif isinstance(case.id_kind, str) and case.id_kind and case.id_kind != "valid":
                headers["id"] = f"{case.id_kind}{index}"  # any text, but one per message
            elif case.id_kind != "valid":
                headers["id"] = case.id_kind
            headers.update(case.extra)
            headers.update(case.changes)
            headers[MARKER] = f"{token}-{index}"
            body, compression = case.body, None
            if case.compress:
                compression = "zlib"
            elif isinstance(headers.get("compression"), str) and headers["compression"] == "zlib" and index % 2:
                body = zlib.compress(body)
            producer.publish(body, exchange=Exchange(""), routing_key=queue, content_type=case.content_type,
                             content_encoding=case.content_encoding, headers=headers, compression=compression,
                             serializer=None, retry=True)
            if not case.protocol1:
                task_id = headers["id"] if isinstance(headers.get("id"), str) else None
            run_ids[index] = task_id
    return run_ids


def outcomes(token: str, run_ids: dict[int, str | None]) -> dict[int, tuple[int, list[Any]]]:
    """{case index: (runs counted under its id, its dead letters)}."""
    from safetynet.models import DeadLetter

    runs = {key.decode(): int(value) for key, value in recording.client().hgetall(message_tasks.RUNS).items()}
    by_id = {task_id: index for index, task_id in run_ids.items() if task_id}
    dead: dict[int, list[Any]] = {index: [] for index in run_ids}
    for row in DeadLetter.objects.filter(headers__msgs_case__startswith=f"{token}-").only(
            "id", "task_id", "reason", "headers", "detail"):
        dead[int(str(row.headers[MARKER]).rsplit("-", 1)[1])].append(row)
    seen = {row.id for rows in dead.values() for row in rows}
    queryable = [task_id for task_id in by_id if "\x00" not in task_id]  # PostgreSQL takes no NUL in a query either
    for row in DeadLetter.objects.filter(task_id__in=queryable).exclude(id__in=seen).only("id", "task_id", "reason"):
        dead[by_id[row.task_id]].append(row)
    return {index: (runs.get(task_id, 0) if task_id else 0, dead[index]) for index, task_id in run_ids.items()}


def left_in_queue(broker: str, queue: str) -> int:
    with Connection(broker) as connection:
        if broker.startswith("redis"):
            client = connection.default_channel.client
            # kombu keeps each unacknowledged message as [message, exchange, routing key] in one hash
            unacked = sum(1 for _, raw in client.hscan_iter("unacked") if json.loads(raw)[2] == queue)
            return int(client.llen(queue)) + unacked
        _, count, _ = Queue(queue, Exchange(""), routing_key=queue, no_declare=True)(
            connection.default_channel).queue_declare(passive=True)
        return int(count)


def _pong(result: Any) -> bool:
    try:
        return bool(result.get(timeout=30) == "pong")
    except Exception:  # a timeout: the worker no longer serves
        return False


@pytest.fixture(scope="module")
def batch():
    drawn = generate(COUNT)
    assert len(drawn) == COUNT
    return drawn


@pytest.mark.parametrize("broker_name", sorted(BROKERS))
def test_every_message_ends_once_and_the_worker_keeps_serving(broker_name, batch, tmp_path, worker_database,
                                                               spool_dir):
    from tests.fixtures import tasks

    broker = BROKERS[broker_name]
    app = configure_app(broker, BACKEND)
    recording.client().delete(message_tasks.RUNS)
    worker = Worker(f"messages-{broker_name}", broker, BACKEND, tmp_path, concurrency=2, database=worker_database,
                    spool_dir=spool_dir, extra_env={"SAFETYNET_TEST_INCLUDE": "tests.fixtures.message_tasks"})
    worker.start(app)
    token = uuid.uuid4().hex[:12]
    started = time.monotonic()
    try:
        run_ids = publish(broker, worker.queue, token, batch)
        deadline = time.monotonic() + 120
        while True:
            ended = outcomes(token, run_ids)
            if all(runs + len(rows) >= 1 for runs, rows in ended.values()) or time.monotonic() > deadline:
                break
            assert worker.process.poll() is None, f"the worker exited; log:\n{worker.log.read_text()[-4000:]}"
            time.sleep(1)
        time.sleep(2)  # a second outcome of any message would come within this
        ended = outcomes(token, run_ids)
        alive = worker.process.poll() is None
        served = alive and _pong(tasks.ping.apply_async(queue=worker.queue))
        queued = left_in_queue(broker, worker.queue)
    finally:
        worker.stop()
        release_app(app)  # not app.close(): the shared test app stays among Celery's active apps
    elapsed = time.monotonic() - started

    wrong = {index: (batch[index], run_ids[index], runs, [(row.reason, row.detail) for row in rows])
             for index, (runs, rows) in ended.items() if runs + len(rows) != 1}
    assert alive and served and not wrong, "\n".join(
        [f"worker alive={alive}, still serving={served}; log: {worker.log}"]
        + [f"{index} {task_id}: {case!r:.600} runs={runs} dead={rows}"
           for index, (case, task_id, runs, rows) in list(wrong.items())[:20]])
    # a well-formed message runs (``strict`` refuses other arguments than one: a permanent error)
    not_run = {index: [(row.reason, row.detail) for row in rows] for index, (runs, rows) in ended.items()
               if batch[index].well_formed and not runs
               and not (batch[index].task == STRICT and rows[0].reason == "permanent_error")}
    assert not not_run, not_run
    reasons = {row.reason for _, rows in ended.values() for row in rows}
    assert {"malformed", "undecodable", "unknown_task", "permanent_error"} <= reasons, reasons
    assert sum(runs for runs, _ in ended.values()) >= sum(case.well_formed for case in batch) // 2
    assert queued == 0
    print(f"messages={COUNT} broker={broker_name} seconds={elapsed:.1f} reasons={sorted(reasons)}")
