"""`letterpress submit --wait` and `batch run --wait` (common/cli/client.py `wait`, `wait_batch`) follow the event
stream instead of polling: progress events move the bar, `done` is the answer, a `timeout` or a dropped connection
is followed by a reconnect with Last-Event-ID, and only a server without the route (404, 405) or without room for
a stream (429) is polled. A scripted server (httpx.MockTransport) records every request the client makes; the last
test follows a batch on the real API process."""
from __future__ import annotations

import json

import httpx
import pytest

from common.cli import client as cli_client
from common.cli.client import BatchClient, Client, sse_events

JOB = "0b7f6d4e-0000-4000-8000-000000000001"
BATCH = "0b7f6d4e-0000-4000-8000-000000000002"


def sse(*events: tuple[str, str | None, dict], keep_alive: bool = False) -> bytes:
    out = b": keep-alive\n\n" if keep_alive else b""
    for event, event_id, data in events:
        out += (f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
                + f"data: {json.dumps(data)}\n\n").encode()
    return out


def job(status: str, step: int, position: int | None = None) -> dict:
    return {"id": JOB, "status": status, "progress": {"step": step, "total": 4}, "queue_position": position,
            "error": None, "images": []}


def batch(status: str, queued: int, succeeded: int) -> dict:
    return {"id": BATCH, "status": status, "request_counts": {
        "total": queued + succeeded, "queued": queued, "running": 0, "succeeded": succeeded, "failed": 0,
        "canceled": 0}}


class Server:
    """Answers from `routes`: path -> a list of answers, one per request (the last one repeats); an answer is an
    httpx.Response or a callable that builds one. Every request is kept in `seen`."""

    def __init__(self, routes: dict[str, list]):
        self.routes, self.seen = routes, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        answers = self.routes[request.url.path]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        return answer() if callable(answer) else answer

    def requests(self, path: str) -> list[httpx.Request]:
        return [r for r in self.seen if r.url.path == path]


@pytest.fixture
def no_sleep(monkeypatch):
    """The reconnect backoff (up to 8 s) skipped."""
    monkeypatch.setattr(cli_client.time, "sleep", lambda s: None)


def stream(body: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


def test_submit_wait_follows_the_stream_across_its_time_limit(capsys):
    server = Server({
        f"/v1/jobs/{JOB}": [httpx.Response(200, json=job("queued", 0, 5))],
        f"/v1/jobs/{JOB}/events": [
            stream(sse(("progress", "queued.0.4.2", {"status": "queued", "step": 0, "total": 4,
                                                     "queue_position": 2, "eta_s": 3.0}),
                       ("progress", "running.1.4.-", {"status": "running", "step": 1, "total": 4,
                                                      "queue_position": None, "eta_s": None}),
                       ("timeout", None, {"reconnect": True, "last_event_id": "running.1.4.-"}), keep_alive=True)),
            stream(sse(("done", "succeeded.4.4.-", job("succeeded", 4))))]})
    client = Client("http://api", "lp_test", transport=httpx.MockTransport(server))
    assert client.wait(JOB) == job("succeeded", 4)
    bar = capsys.readouterr().err  # the bar as before: steps of the total, the status and the queue position
    assert "#5 in queue" in bar and "#2 in queue" in bar and "1/4" in bar and "running" in bar
    assert "4/4" in bar and "succeeded" in bar
    assert len(server.requests(f"/v1/jobs/{JOB}")) == 1  # the first read only: no polling
    first, second = server.requests(f"/v1/jobs/{JOB}/events")
    assert "last-event-id" not in first.headers and second.headers["last-event-id"] == "running.1.4.-"


def test_a_dropped_connection_is_resumed_from_the_last_event_seen(no_sleep):
    def dropped() -> httpx.Response:
        def body():
            yield sse(("progress", "in_progress.2.2.0.0.0.0", {"status": "in_progress",
                                                                "request_counts": batch("", 2, 0)["request_counts"],
                                                                "items_per_min": None, "eta_s": None}))
            raise httpx.ReadError("connection reset by peer")
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    server = Server({
        f"/v1/batches/{BATCH}": [httpx.Response(200, json=batch("in_progress", 2, 0))],
        f"/v1/batches/{BATCH}/events": [dropped, stream(sse(("done", "completed.2.0.0.2.0.0",
                                                                    batch("completed", 0, 2))))]})
    client = BatchClient("http://api", "lp_test", transport=httpx.MockTransport(server))
    assert client.wait_batch(BATCH, show_progress=False) == batch("completed", 0, 2)
    assert [r.headers.get("last-event-id") for r in server.requests(f"/v1/batches/{BATCH}/events")] == [
        None, "in_progress.2.2.0.0.0.0"]
    assert len(server.requests(f"/v1/batches/{BATCH}")) == 1


def test_the_batch_bar_moves_with_the_events(capsys):
    server = Server({
        f"/v1/batches/{BATCH}": [httpx.Response(200, json=batch("in_progress", 3, 0))],
        f"/v1/batches/{BATCH}/events": [stream(sse(
            ("progress", "a", {"status": "in_progress", "request_counts": batch("", 2, 1)["request_counts"],
                               "items_per_min": 6.0, "eta_s": 20.0}),
            ("done", "b", batch("completed", 0, 3))))]})
    BatchClient("http://api", "lp_test", transport=httpx.MockTransport(server)).wait_batch(BATCH)
    bar = capsys.readouterr().err
    assert "1/3" in bar and "3/3" in bar and "status=completed" in bar and "ok=3" in bar


@pytest.mark.parametrize("status", [404, 405, 429])
def test_a_server_without_the_stream_is_polled(status):
    server = Server({
        f"/v1/jobs/{JOB}": [httpx.Response(200, json=job("queued", 0, 1)), httpx.Response(200, json=job("running", 2)),
                            httpx.Response(200, json=job("succeeded", 4))],
        f"/v1/jobs/{JOB}/events": [httpx.Response(status, json={"error": {"type": "x", "message": "x"}})]})
    client = Client("http://api", "lp_test", transport=httpx.MockTransport(server))
    assert client.wait(JOB, poll_s=0, show_progress=False)["status"] == "succeeded"
    assert len(server.requests(f"/v1/jobs/{JOB}")) == 3 and len(server.requests(f"/v1/jobs/{JOB}/events")) == 1


def test_other_refusals_end_the_command_and_a_dead_server_is_not_retried_forever(no_sleep):
    refused = Server({f"/v1/jobs/{JOB}": [httpx.Response(200, json=job("queued", 0))],
                      f"/v1/jobs/{JOB}/events": [httpx.Response(401, json={"error": {"type": "unauthorized",
                                                                                     "message": "invalid API key"}})]})
    with pytest.raises(SystemExit, match="error 401: invalid API key"):
        Client("http://api", "lp_test", transport=httpx.MockTransport(refused)).wait(JOB, show_progress=False)

    def down() -> httpx.Response:
        raise httpx.ConnectError("connection refused")
    dead = Server({f"/v1/jobs/{JOB}": [httpx.Response(200, json=job("queued", 0))], f"/v1/jobs/{JOB}/events": [down]})
    with pytest.raises(SystemExit, match="lost the event stream"):
        Client("http://api", "lp_test", transport=httpx.MockTransport(dead)).wait(JOB, show_progress=False)
    assert len(dead.requests(f"/v1/jobs/{JOB}/events")) == cli_client.STREAM_RETRIES + 1


def test_sse_events_parses_the_wire_format():
    lines = ["event: progress", "id: a", "data: {\"x\": 1}", "", ": keep-alive", "", "event: done", "data:[1,",
             "data: 2]", ""]
    assert list(sse_events(lines)) == [("progress", "a", {"x": 1}), ("done", None, [1, 2])]


def test_batch_wait_follows_the_real_stream_to_done(api_url, tenant):
    """Against the real API process: the batch (held on a list no worker serves) is finished in the database
    once the client's stream is open; the client sees it end through the stream, reading the batch itself once."""
    import threading

    from common.cli.polling import wait_until
    from tests.api.test_batch_events import move, new_batch
    from tests.support import ApiClient

    batch_id, jobs = new_batch(ApiClient(api_url, tenant.key), 2)
    seen: list[httpx.Request] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return super().handle_request(request)

    def finish() -> None:
        wait_until(lambda: any(r.url.path.endswith("/events") for r in seen), 30, interval=0.05, what="the stream")
        move({jobs[0]: "succeeded", jobs[1]: "failed"}, finalize=batch_id)

    driver = threading.Thread(target=finish)
    driver.start()
    done = BatchClient(api_url, tenant.key, transport=Recording()).wait_batch(batch_id, show_progress=False)
    driver.join()
    assert done["status"] == "completed" and done["request_counts"]["succeeded"] == 1
    assert [r.url.path for r in seen][0] == f"/v1/batches/{batch_id}"
    assert {r.url.path for r in seen[1:]} == {f"/v1/batches/{batch_id}/events"}  # no polling
