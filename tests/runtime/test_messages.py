"""``messages.problem``: what keeps Celery from taking a broker message as a task (no broker needed)."""

import base64
import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.message import Message

from safetynet.runtime.messages import problem

NAME = "tests.fixtures.dead_letter_tasks.ok"


def message(body, headers=None, content_type="application/json", content_encoding="utf-8", encode=True):
    task_id = str(uuid.uuid4())
    base = {"lang": "py", "task": NAME, "id": task_id, "retries": 0, "root_id": task_id, "parent_id": None,
            "group": None, "eta": None, "expires": None, "timelimit": [None, None], "argsrepr": "()",
            "kwargsrepr": "{}", "origin": "test"}
    if headers is not None:
        base = {key: value for key, value in {**base, **headers}.items() if value is not DROP}
    raw = json.dumps(body).encode() if encode else body
    return Message(body=raw, content_type=content_type, content_encoding=content_encoding, headers=base,
                   accept=["application/json"])


DROP = object()


def registered(name):
    return name == NAME


def test_a_task_message_as_celery_sends_it_has_no_problem():
    assert problem(message([[1], {"a": 2}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]),
                   registered) is None
    assert problem(message([[], {}, None]), registered) is None


@pytest.mark.parametrize("body, words", [
    ("just a string", "not [args, kwargs, embed]: a str"),
    ({"a": 1, "b": 2, "c": 3}, "not [args, kwargs, embed]: a dict"),
    ([[1], {}], "a list of 2"),
    ([[1], {}, {}, {}], "a list of 4"),
    (["abc", {}, None], "positional arguments are not a list"),
    ([[], [], None], "keyword arguments are not a mapping"),
    ([[], {}, [1]], "is not a mapping: a list"),
    ([[], {}, {"id": "other"}], "would replace a field"),
    ([[], {}, {"get": 1}], "would replace a field"),
    ([[], {}, {"callbacks": "x"}], "callbacks is not a list of signatures"),
    ([[], {}, {"callbacks": [{"args": []}]}], "has no task name"),
    ([[], {}, {"chord": {"task": "t", "kwargs": []}}], "kwargs are not a mapping"),
    (5, "a int"),
])
def test_a_body_that_is_not_args_kwargs_embed(body, words):
    found = problem(message(body), registered)
    assert found is not None and words in found.detail and not found.undecodable


@pytest.mark.parametrize("headers, words", [
    ({"id": DROP}, "the task id is missing"),
    ({"id": 5}, "the task id is not a text: a int"),
    ({"task": ["a"]}, "the task name is not a text: a list"),
    ({"task": ""}, "the task name is empty"),
    ({"retries": "x"}, "'retries'"),
    ({"retries": -1}, "'retries'"),
    ({"retries": True}, "'retries'"),
    ({"eta": "tomorrow"}, "'eta' field is not a usable ISO 8601 date"),
    ({"eta": 5}, "'eta' field is not an ISO 8601 date"),
    ({"eta": "9999-12-31T23:59:59-14:00"}, "'eta'"),
    ({"expires": {"a": 1}}, "'expires'"),
    ({"timelimit": "60"}, "'timelimit'"),
    ({"timelimit": [1, 2, 3]}, "'timelimit'"),
    ({"timelimit": [-1, None]}, "'timelimit'"),
    ({"timelimit": ["a", None]}, "'timelimit'"),
    ({"shadow": 5}, "'shadow'"),
    ({"argsrepr": ["x"]}, "'argsrepr'"),
    ({"ignore_result": "yes"}, "'ignore_result'"),
    ({"headers": "x"}, "'headers'"),
    ({"get": 1}, "would replace a method"),
    ({"_protected": 1}, "would replace a method"),
    ({"chord": "x"}, "chord: a signature is not a mapping"),
    ({"stamps": []}, "'stamps'"),
])
def test_headers_celery_cannot_use(headers, words):
    found = problem(message([[], {}, None], headers), registered)
    assert found is not None and words in found.detail, found


def test_a_past_eta_and_a_later_expiry_are_fine():
    assert problem(message([[], {}, None], {"eta": "2001-02-03T04:05:06+00:00",
                                            "expires": "2999-01-01T00:00:00+00:00"}), registered) is None


def test_an_unknown_task_is_left_to_celery_once_its_name_and_id_are_texts():
    assert problem(message("just a string", {"task": "not.registered"}), registered) is None
    assert problem(message("just a string", {"task": "not.registered", "id": None}), registered) is not None


def test_a_body_that_cannot_be_decoded_is_undecodable():
    found = problem(message(b"{not json", encode=False), registered)
    assert found is not None and found.undecodable and found.error is not None
    refused = problem(message([[], {}, None], content_type="application/x-python-serialize"), registered)
    assert refused is not None and refused.undecodable


def test_protocol_1_and_the_hybrid_form():
    task_id = str(uuid.uuid4())
    body = {"task": NAME, "id": task_id, "args": [1], "kwargs": {}}
    proto1 = Message(body=json.dumps(body).encode(), content_type="application/json", content_encoding="utf-8",
                     headers={}, accept=["application/json"])
    assert problem(proto1, registered) is None
    bad = Message(body=json.dumps({**body, "kwargs": [1]}).encode(), content_type="application/json",
                  content_encoding="utf-8", headers={}, accept=["application/json"])
    assert "keyword arguments are not a mapping" in problem(bad, registered).detail
    nameless = Message(body=json.dumps([1, 2]).encode(), content_type="application/json", content_encoding="utf-8",
                       headers={}, accept=["application/json"])
    assert "no task name" in problem(nameless, registered).detail
    hybrid = message({"args": "x", "kwargs": {}})
    assert "positional arguments are not a list" in problem(hybrid, registered).detail


def test_headers_that_are_not_a_mapping():
    odd = Message(body=b"[]", content_type="application/json", content_encoding="utf-8", headers=None,
                  accept=["application/json"])
    odd.headers = ["task", NAME]
    assert "headers are not a mapping" in problem(odd, registered).detail


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(body=json_values, headers=st.dictionaries(st.sampled_from(
    ["id", "task", "retries", "eta", "expires", "timelimit", "shadow", "headers", "chord", "callbacks", "get",
     "ignore_result", "stamps", "group_index", "x"]), json_values, max_size=5))
def test_the_check_never_raises(body, headers):
    try:
        raw = json.dumps(body).encode()
    except ValueError:
        raw = b"null"
    found = problem(message(raw, headers, encode=False), registered)
    assert found is None or found.detail


# -- the guard on a consumer: one dead letter, the message acknowledged, a replay that is well formed -------

@pytest.fixture
def queue():
    import redis

    from tests.celery_app import app

    name = f"safetynet-replay-{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(app.conf.broker_url).delete(name)


@pytest.mark.django_db
def test_the_guard_records_a_malformed_message_once_and_its_replay_is_a_fresh_message(queue):
    import redis

    from safetynet import deadletter
    from safetynet.models import DeadLetter
    from safetynet.runtime.consumer import guard_task_handler
    from tests.celery_app import app
    from tests.fixtures.consumer import bare_consumer, received

    task_id = f"malformed-{uuid.uuid4()}"
    message = received({"lang": "py", "task": NAME, "id": task_id, "retries": 0, "timelimit": "sixty",
                        "eta": None, "origin": "somewhere", "x-order": "A-17"}, [[5], {}, None])
    handler = guard_task_handler(bare_consumer(NAME), lambda message: pytest.fail("Celery must not see it"))
    handler(message)
    assert message.acknowledged
    [row] = DeadLetter.objects.filter(task_id=task_id)
    assert row.reason == "malformed" and "'timelimit'" in row.detail and row.args == [5]
    assert row.headers["timelimit"] == "sixty"  # kept as it came, for whoever reads the row

    [outcome] = deadletter.replay(row, queue=queue)
    assert outcome.error is None
    [raw] = redis.Redis.from_url(app.conf.broker_url).lrange(queue, 0, -1)
    sent = json.loads(raw)
    assert sent["headers"]["timelimit"] == [None, None] and sent["headers"]["origin"] != "somewhere"
    assert sent["headers"]["x-order"] == "A-17" and sent["headers"]["id"] == outcome.new_task_id
    assert sent["properties"]["body_encoding"] == "base64"  # kombu's Redis transport
    replayed = Message(body=base64.b64decode(sent["body"]), content_type=sent["content-type"],
                       content_encoding=sent["content-encoding"], headers=sent["headers"],
                       accept=["application/json"])
    assert problem(replayed, registered) is None


def test_a_message_without_a_usable_id_gets_one_of_its_own(db):
    from safetynet.models import DeadLetter
    from safetynet.runtime.consumer import guard_task_handler
    from tests.fixtures.consumer import bare_consumer, received

    marker = uuid.uuid4().hex
    handler = guard_task_handler(bare_consumer(NAME), lambda message: pytest.fail("Celery must not see it"))
    for task_id in (5, None, ["a"]):
        handler(received({"lang": "py", "task": NAME, "id": task_id, "marker": marker}, [[], {}, None]))
    rows = list(DeadLetter.objects.filter(headers__marker=marker))
    assert len(rows) == 3 and len({row.task_id for row in rows}) == 3
    assert all(row.task_id.startswith("malformed-") and row.reason == "malformed" for row in rows)
    assert sorted(str(row.headers.get("id")) for row in rows) == ["5", "None", "['a']"]


def test_a_malformed_protocol_1_message_is_recorded_under_its_body_name_and_id(db):
    from safetynet.models import DeadLetter
    from safetynet.runtime.consumer import guard_task_handler
    from tests.fixtures.consumer import bare_consumer, received

    task_id = f"proto1-{uuid.uuid4()}"
    handler = guard_task_handler(bare_consumer(NAME), lambda message: pytest.fail("Celery must not see it"))
    message = received({}, {"task": NAME, "id": task_id, "args": [1], "kwargs": {}, "eta": "tomorrow"})
    handler(message)
    [row] = DeadLetter.objects.filter(task_id=task_id)
    assert (row.task_name, row.reason, row.args) == (NAME, "malformed", [1]) and "'eta'" in row.detail
    assert message.acknowledged
