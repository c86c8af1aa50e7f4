"""`GET /v1/jobs/{id}/events` (api/event_streams.py) against the real API process and worker: progress snapshots as
the job runs, `done` with the job object at the end, resumption with Last-Event-ID across the stream's time limit
(2 s in the test stack) without a repeated event, keep-alive comments while nothing changes, and another tenant's
job as a 404."""
from __future__ import annotations

import json

from tests.support import ApiClient, make_tenant

JOB = {"prompt": "a poster that says LIVE", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 21,
       "steps": 8}


def read_stream(client: ApiClient, job_id: str, last_event_id: str | None = None) -> list[dict]:
    """One connection's events: [{event, id, data}] and {"comment": ...} for comment lines."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events, current = [], {}
    with client.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
        for line in resp.iter_lines():
            if line.startswith(":"):
                events.append({"comment": line})
            elif line == "":
                if current:
                    events.append(current)
                current = {}
            else:
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events


def test_a_job_streams_its_progress_then_done_and_resumes_without_repeats(client, worker):
    job_id = client.submit(JOB).json()["id"]
    seen, last = [], None
    for _ in range(60):  # each connection lasts at most 2 s here: reconnect as a client would
        got = [e for e in read_stream(client, job_id, last) if "event" in e]
        seen += got
        if got and got[-1]["event"] == "done":
            break
        ids = [e["id"] for e in got if "id" in e]
        last = ids[-1] if ids else last
    assert seen[-1]["event"] == "done" and seen[-1]["data"]["status"] == "succeeded"
    assert seen[-1]["data"]["images"][0]["sha256"]
    progress = [e for e in seen if e["event"] == "progress"]
    ids = [e["id"] for e in seen if "id" in e]
    assert len(ids) == len(set(ids)), ids  # nothing sent twice across reconnects
    steps = [e["data"]["step"] for e in progress if e["data"]["status"] == "running"]
    assert steps == sorted(steps) and all(e["data"]["total"] == 8 for e in progress)
    # the client saw `done`: reconnecting with its id gives nothing more
    assert [e for e in read_stream(client, job_id, seen[-1]["id"]) if "event" in e] == []


def test_a_waiting_job_times_out_unchanged_and_strangers_get_404(api_url, stack_env):
    from common.db import session_scope
    from common.job_states import create_job

    owner = make_tenant()
    with session_scope() as session:  # queued on a list no worker serves (maintenance sends only QUEUES): it waits
        job, _ = create_job(session, tenant_id=owner.id, queue="held-by-test", params={
            "prompt": "x", "prompt_text": "x", "preset": "V4_TURBO_12", "width": 256, "height": 256, "steps": 2,
            "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0, 3.0], "seed": 1, "seed_generated": False,
            "num_images": 1})
        job_id = str(job.id)
    client = ApiClient(api_url, owner.key)
    events = read_stream(client, job_id)
    assert events[0]["event"] == "progress" and events[0]["data"]["status"] == "queued"
    assert events[-1]["event"] == "timeout" and events[-1]["data"]["reconnect"] is True
    assert len([e for e in events if "event" in e]) == 2  # nothing changed in between
    stranger = ApiClient(api_url, make_tenant().key).http.get(f"/v1/jobs/{job_id}/events")
    assert stranger.status_code == 404 and stranger.json()["error"]["type"] == "not_found"
    with session_scope() as session:
        from common.job_states import cancel, get_job

        cancel(session, job=get_job(session, job_id))
    done = read_stream(client, job_id)
    assert done[-1]["event"] == "done" and done[-1]["data"]["status"] == "canceled"


def test_a_running_job_streams_previews_of_itself(client, worker, stack_env):
    """The test stack turns previews on (every 2 steps): while the job runs, its progress carries a small JPEG
    sketch the worker made from the latents (worker/pipeline/previews.py)."""
    import base64
    import io

    from PIL import Image

    assert stack_env["LETTERPRESS_WORKER__PREVIEW_EVERY_STEPS"] == "2"
    job_id = client.submit({**JOB, "steps": 40, "seed": 22}).json()["id"]
    sketches, last = [], None
    for _ in range(60):
        got = [e for e in read_stream(client, job_id, last) if "event" in e]
        sketches += [e["data"]["preview"] for e in got if e["event"] == "progress" and "preview" in e["data"]]
        if got and got[-1]["event"] == "done":
            break
        ids = [e["id"] for e in got if "id" in e]
        last = ids[-1] if ids else last
    assert sketches, "no preview reached the stream while the job ran"
    prefix = "data:image/jpeg;base64,"
    assert all(s.startswith(prefix) for s in sketches)
    with Image.open(io.BytesIO(base64.b64decode(sketches[-1][len(prefix):]))) as image:
        assert image.format == "JPEG" and image.size == (32, 32)  # the latents' size: 1/8 of 256x256
