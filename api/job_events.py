"""The job stream's names where its first callers import them (api/routers/jobs.py, the console): `job_events`,
`check_room`, `snapshot_id`. The stream itself, of jobs and batches, lives in api/event_streams.py."""
from __future__ import annotations

from api.event_streams import check_room, job_events
from api.event_streams import job_snapshot_id as snapshot_id

__all__ = ["check_room", "job_events", "snapshot_id"]
