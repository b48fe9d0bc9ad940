"""Publishing against the real broker: batches are confirmed together, nothing is dropped."""

from __future__ import annotations

import json
import uuid

import pytest

from queueworker.celery import app
from tasks_app import dispatch

pytestmark = pytest.mark.integration

QUEUE = "compensation"  # no worker consumes it in these tests


@pytest.fixture
def drain():
    """Messages left on QUEUE, read back with basic_get; the queue is emptied around the test."""

    def read() -> list[dict]:
        bodies = []
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            while (message := channel.basic_get(QUEUE, no_ack=True)) is not None:
                bodies.append(
                    {
                        "headers": message.headers,
                        "body": json.loads(message.body),
                        "exchange": message.delivery_info["exchange"],
                    }
                )
        return bodies

    with app.connection_for_write() as conn:
        app.amqp.queues[QUEUE](conn.default_channel).declare()
    read()
    yield read
    read()


def _wakeups(n: int, **overrides) -> list[dispatch.Wakeup]:
    base = {"type": "COMPENSATION", "queue": QUEUE, "priority": 3, "timeout_s": 30}
    base.update(overrides)
    return [dispatch.Wakeup(str(uuid.uuid4()), **base) for _ in range(n)]


@pytest.mark.parametrize("count", [1, 250])
def test_publish_delivers_every_wakeup_with_ids_only(drain, count):
    dispatch.reset_breaker()
    wakeups = _wakeups(count)

    assert dispatch.publish(wakeups, max_tasks=1) == count

    messages = drain()
    assert sorted(m["headers"]["id"] for m in messages) == sorted(w.task_id for w in wakeups)
    for message in messages:
        args, kwargs, _ = message["body"]
        assert args == []
        assert set(kwargs) == {"taskType", "taskId", "delay", "metadata"}
        assert kwargs["taskType"] == "COMPENSATION" and kwargs["delay"] == 0
        assert message["headers"]["task"] == dispatch.EXECUTE_TASK
        assert message["exchange"] == "tasks"  # docs/architecture.md: the one direct exchange
        assert message["headers"]["timelimit"] == [30 + dispatch.HARD_LIMIT_GRACE_S, 30]


def test_batches_reuse_the_pooled_connection(drain):
    dispatch.reset_breaker()
    for _ in range(3):
        assert dispatch.publish(_wakeups(20), max_tasks=1) == 20
    assert len(drain()) == 60


class Proxy:
    """A TCP forwarder to the real broker that can be switched off (refusing connections)."""

    def __init__(self, target: tuple[str, int]) -> None:
        import socket

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.target = target
        self.server = None

    def start(self) -> None:
        import socket
        import threading

        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(20)
        self.server = server

        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (a, b):
                    try:
                        sock.close()
                    except OSError:
                        pass

        def serve():
            while True:
                try:
                    client, _ = server.accept()
                except OSError:
                    return
                upstream = socket.create_connection(self.target)
                threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.mark.django_db
def test_batches_publish_again_once_the_broker_is_back(drain):
    from urllib.parse import urlsplit, urlunsplit

    from tests.integration.test_recovery import _use_broker

    real = app.conf.broker_url
    parts = urlsplit(real)
    proxy = Proxy((parts.hostname, parts.port or 5672))
    _use_broker(urlunsplit(parts._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}")))
    try:
        # given an outage that left the pooled connection broken
        assert dispatch.publish(_wakeups(1)) == 0
        dispatch.reset_breaker()
        # (one message per task: five wake-ups of one kind would otherwise share one message)
        assert dispatch.publish(_wakeups(5), max_tasks=1) == 0
        dispatch.reset_breaker()

        # when the broker is back, the very next batch goes through
        proxy.start()
        assert dispatch.publish(_wakeups(5), max_tasks=1) == 5
    finally:
        proxy.stop()
        _use_broker(real)
    assert len(drain()) == 5
