"""worker.drain: the drain's grace period, and the spot-notice watcher against a real local HTTP server that plays
the metadata service (404 until a stop is scheduled, then 200)."""
from __future__ import annotations

import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import free_port, wait_until
from worker.drain import Drain, SpotNoticeWatcher


# --------------------------------------------------------------------------------------------------- Drain

def test_a_fresh_drain_is_neither_draining_nor_expired():
    drain = Drain(grace_s=0.0)
    assert not drain.draining and not drain.expired()


def test_drain_expires_after_its_grace():
    drain = Drain(grace_s=0.3)
    drain.start("test")
    assert drain.draining and not drain.expired()
    time.sleep(0.35)
    assert drain.expired()


def test_zero_grace_expires_at_once():
    drain = Drain(grace_s=0.0)
    drain.start("sigterm")
    assert drain.draining and drain.expired()


def test_a_second_start_keeps_the_first_deadline():
    drain = Drain(grace_s=0.3)
    drain.start("first")
    time.sleep(0.2)
    drain.start("second")  # would push the deadline to +0.3 from now if it reset
    time.sleep(0.15)
    assert drain.expired()


def test_concurrent_starts_set_one_deadline():
    drain = Drain(grace_s=60)
    threads = [threading.Thread(target=drain.start, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert drain.draining and not drain.expired()


# ------------------------------------------------------------------------------------ spot-notice watcher

class Metadata:
    """A metadata endpoint on a free port: `answer` is (status, body); every request is counted."""

    def __init__(self):
        self.answer = (404, b"")
        self.requests: list[dict] = []
        self.imdsv2 = False  # like AWS with IMDSv2 required: 401 to a GET without a session token
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802 - http.server's name
                issued = outer.imdsv2 and self.path == "/latest/api/token" and \
                    self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                body = b"session-token" if issued else b""
                self.send_response(200 if issued else 405)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's name
                outer.requests.append({"path": self.path, "flavor": self.headers.get("Metadata-Flavor")})
                status, body = outer.answer
                if outer.imdsv2 and self.headers.get("X-aws-ec2-metadata-token") != "session-token":
                    status, body = 401, b""
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/latest/meta-data/spot/instance-action"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metadata():
    server = Metadata()
    yield server
    server.close()


@pytest.mark.parametrize("status, body, seen", [
    (404, b"", False),                                    # AWS: no stop scheduled
    (200, b'{"action": "terminate", "time": "2025-01-01T00:00:00Z"}', True),  # AWS: a stop is scheduled
    (200, b"TRUE", True),                                 # GCP: preempted
    (200, b"FALSE", False),                               # GCP: not preempted
    (200, b"false\n", False),
    (200, b"", False),
    (500, b"TRUE", False),
])
def test_notice_seen_reads_the_metadata_answer(metadata, status, body, seen):
    metadata.answer = (status, body)
    watcher = SpotNoticeWatcher(metadata.url, Drain(1.0))
    assert watcher.notice_seen() is seen
    assert metadata.requests[-1] == {"path": "/latest/meta-data/spot/instance-action", "flavor": "Google"}


def test_notice_seen_on_aws_with_imdsv2_required(metadata):
    metadata.imdsv2, metadata.answer = True, (200, b'{"action": "stop", "time": "2025-01-01T00:00:00Z"}')
    assert SpotNoticeWatcher(metadata.url, Drain(1.0)).notice_seen() is True
    metadata.answer = (404, b"")
    assert SpotNoticeWatcher(metadata.url, Drain(1.0)).notice_seen() is False


def test_an_unreachable_metadata_service_is_no_notice():
    watcher = SpotNoticeWatcher(f"http://127.0.0.1:{free_port()}/preempted", Drain(1.0))
    assert watcher.notice_seen() is False


@pytest.fixture
def sigterms():
    """SIGTERM caught in this test (the watcher signals its own process); the previous handler comes back."""
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGTERM, previous)


def test_watcher_polls_until_a_notice_then_drains_and_sends_sigterm(metadata, sigterms):
    drain = Drain(grace_s=30)
    watcher = SpotNoticeWatcher(metadata.url, drain, period_s=0.05)
    watcher.start()
    wait_until(lambda: len(metadata.requests) >= 3, 10, what="a few polls")
    assert not drain.draining and sigterms == []  # 404: keep serving
    metadata.answer = (200, b'{"action": "stop"}')
    watcher.join(timeout=10)
    assert not watcher.is_alive()
    assert drain.draining and not drain.expired()
    wait_until(lambda: sigterms, 5, what="SIGTERM delivered to this process")
    assert sigterms == [signal.SIGTERM]
    polled = len(metadata.requests)
    time.sleep(0.2)
    assert len(metadata.requests) == polled  # the watcher stopped polling


def test_watcher_of_a_worker_already_draining_does_nothing(metadata, sigterms):
    drain = Drain(grace_s=30)
    drain.start("SIGTERM")
    metadata.answer = (200, b"TRUE")
    watcher = SpotNoticeWatcher(metadata.url, drain, period_s=0.05)
    watcher.start()
    watcher.join(timeout=5)
    assert not watcher.is_alive()
    assert metadata.requests == [] and sigterms == []
