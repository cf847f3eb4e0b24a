"""The queues page: depths read from the real broker, a clear "unknown" within its timeout when the broker is away."""

import os
import socket
import threading
import time
import uuid

import pytest
from celery import Celery
from django.urls import reverse
from kombu import Exchange, Producer, Queue

from safetynet.dashboard import brokers
from tests.celery_app import app
from tests.fixtures.dead_letters import throwaway_queue  # noqa: F401
from tests.fixtures.web import logged_in, person

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_answers():
    brokers.forget()
    yield
    brokers.forget()


@pytest.fixture
def routed(throwaway_queue):
    """The test app routes a task to the throwaway queue, so the page knows that queue."""
    before = app.conf.task_routes
    app.conf.task_routes = {"tests.fixtures.tasks.ping": {"queue": throwaway_queue}}
    yield throwaway_queue
    app.conf.task_routes = before


def publish(queue, count):
    with app.connection_for_write() as connection:
        producer = Producer(connection.default_channel)
        target = Queue(queue, Exchange(queue), routing_key=queue)
        for number in range(count):
            producer.publish({"n": number}, exchange=target.exchange, routing_key=queue, declare=[target])


@pytest.fixture
def silent_broker():
    """A TCP port that accepts connections and never says a word: the slowest broker there is."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(50)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def test_the_depth_of_each_queue_comes_from_the_broker(routed):
    publish(routed, 3)
    shown = brokers.snapshot(app)
    depths = {queue["name"]: queue["depth"] for queue in shown.queues}
    assert depths[routed] == 3
    assert shown.broker_error == ""
    # the default queue is listed too; Redis keeps no empty list, which reads as an empty queue, not an error
    assert app.conf.task_default_queue in depths


def test_the_page_shows_the_depth_and_says_no_worker_answered(routed):
    publish(routed, 2)
    client = logged_in(person("root", superuser=True))
    response = client.get(reverse("safetynet_dashboard:queues"))
    assert response.status_code == 200
    page = response.content.decode()
    assert f'data-figure="queue:{routed}:depth" class="depth">2<' in page
    live = client.get(reverse("safetynet_dashboard:live", args=["queues"])).json()["figures"]
    assert live[f"queue:{routed}:depth"] == 2


def test_a_broker_that_does_not_answer_makes_the_page_say_unknown_within_its_timeout(silent_broker):
    away = Celery("away", broker=silent_broker, set_as_current=False)
    began = time.monotonic()
    shown = brokers.snapshot(away)
    took = time.monotonic() - began
    assert took < brokers.BROKER_TIMEOUT + 0.5
    assert [queue["depth"] for queue in shown.queues] == [None]
    assert shown.broker_error and shown.workers == []
    # the next page does not wait for it again at once: the failure is remembered for a moment
    began = time.monotonic()
    brokers.snapshot(away)
    assert time.monotonic() - began < 0.5


def test_the_view_with_a_silent_broker_answers_in_under_two_seconds(silent_broker):
    away = Celery("away", broker=silent_broker, set_as_current=False)
    client = logged_in(person("root", superuser=True))
    away.set_current()
    try:
        began = time.monotonic()
        response = client.get(reverse("safetynet_dashboard:queues"))
        took = time.monotonic() - began
    finally:
        app.set_current()
    assert response.status_code == 200 and took < 2.0
    page = response.content.decode()
    assert 'id="broker-error"' in page and ">unknown<" in page


RABBITMQ_URL = os.environ.get("SAFETYNET_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture
def rabbitmq_app():
    """An app on RabbitMQ (skipped when no RabbitMQ answers there), and a queue of its own."""
    rabbit = Celery("rabbit", broker=RABBITMQ_URL, set_as_current=False)
    try:
        with rabbit.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception as error:
        pytest.skip(f"no RabbitMQ at {RABBITMQ_URL}: {error!r}")
    name = f"safetynet-test-{uuid.uuid4().hex}"
    rabbit.conf.task_routes = {"tests.fixtures.tasks.ping": {"queue": name}}
    yield rabbit, name
    with rabbit.connection_for_write() as connection:
        Queue(name)(connection.default_channel).delete()


def test_the_depth_of_a_rabbitmq_queue_and_one_it_does_not_know(rabbitmq_app):
    rabbit, name = rabbitmq_app
    with rabbit.connection_for_write() as connection:
        target = Queue(name, Exchange(name), routing_key=name)
        producer = Producer(connection.default_channel)
        for number in range(4):
            producer.publish({"n": number}, exchange=target.exchange, routing_key=name, declare=[target])
    shown = brokers.snapshot(rabbit)
    depths = {queue["name"]: (queue["depth"], queue["note"]) for queue in shown.queues}
    assert depths[name] == (4, "")
    # "celery" was never declared on this vhost: RabbitMQ does not know it, and the page says so
    assert depths["celery"] in ((None, "not declared"), (0, ""))
    assert shown.broker_error == ""


def test_a_database_broker_has_depths_and_no_worker_to_ask(tmp_path):
    # kombu's SQLAlchemy transport (the demo's default): no broadcast, so no worker answers; the depth is read
    files = Celery("files", broker=f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}", set_as_current=False)
    files.send_task("tests.fixtures.tasks.ping", ())
    files.send_task("tests.fixtures.tasks.ping", ())
    shown = brokers.snapshot(files)
    assert [(queue["name"], queue["depth"]) for queue in shown.queues] == [("celery", 2)]
    assert shown.broker_error == "" and shown.workers == []
