"""One attempt at one job: claim, generate with a heartbeat, store the PNGs, record the result.

With dynamic batching on (worker.co_batching), the attempt also claims compatible queued jobs and generates them in
the same call; each of them is still claimed, heartbeated, fenced, stored and recorded on its own (a `Member`).

Every database write after the claim is fenced by the attempt's lease token (common.job_states). Images are written
to storage before the job is marked succeeded, at deterministic keys, so a re-run overwrites the same bytes.

The GPU never waits for the finishing work: once a job's images exist, PNG encoding, the storage writes and the
completing write run on a finisher thread while the task returns and the next job starts generating (at most one
job finishes at a time; the next hand-off waits for it). The heartbeat keeps the lease until the job is complete.
Returning early means Celery acks the message (acks_late) before the images are stored; that is safe because
Postgres, not the message, is the record: if the process dies while finishing, the job is still `running` under
a lease nobody renews, and maintenance requeues it once the lease expires (counting the attempt, as for any
crash), the re-run writing the same bytes to the same keys. A worker that shuts down waits for the finisher
(`wait_for_finishing`, from the Celery shutdown hook).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis as redis_lib
from sqlalchemy.exc import SQLAlchemyError

from common import job_states, result_cache, thumbnails
from common import previews as preview_store
from common.db import session_scope
from common.dispatch import dispatch
from common.errors import LeaseLost, NotFound, StorageError
from common.image_files import FORMATS, encode_image, recipe, sha256_hex
from common.job_request import image_seeds
from common.settings import Settings
from common.storage import Storage, image_key
from common.usage import DeviceTime, record_attempt
from worker.co_batching import CANDIDATE_SCAN, CoBatchingPolicy, companions
from worker.drain import Drain
from worker import metrics
from worker.heartbeat import AttemptMonitor
from worker.adapter_files import AdapterFiles
from worker.pipeline.adapters import LoraUse
from worker.pipeline.magic_prompt import EnhanceRequest, MagicPrompt
from worker.pipeline.previews import PreviewRequest
from worker.pipeline.spec import GenerationInterrupted, GenerationSpec, InitImage

log = logging.getLogger(__name__)


@dataclass
class AttemptContext:
    settings: Settings
    runner: object  # worker.pipeline.runner.PipelineRunner (duck-typed so tests can pass another runner)
    storage: Storage
    drain: Drain
    worker_id: str
    overlap_finish: bool = True  # store and complete on the finisher thread while the next job generates
    batching: CoBatchingPolicy = field(default_factory=CoBatchingPolicy)  # off unless configured
    current_job: uuid.UUID | None = None  # the job generating now (worker.presence shows it)
    adapter_files: AdapterFiles | None = None  # made on the first job with adapters
    magic: MagicPrompt | None = None  # made on the first job with a magic prompt
    preview_client: redis_lib.Redis | None = None  # made on the first job with previews on

    def adapter_path(self, tenant_id: uuid.UUID, lora: dict) -> Path:
        """The local, verified file of one of a job's adapters (`params["loras"][i]`)."""
        if self.adapter_files is None:
            self.adapter_files = AdapterFiles(self.storage, self.settings.adapter_cache_dir,
                                              self.settings.adapters.cache_bytes)
        return self.adapter_files.path(tenant_id=tenant_id, sha256=lora["sha256"], name=lora["name"])

    def magic_prompt(self) -> MagicPrompt:
        """The prompt enhancer of this worker's pipeline (or of the configured endpoint)."""
        if self.magic is None:
            if self.runner.loaded is None:
                self.runner.load()
            self.magic = MagicPrompt(self.runner.loaded, self.settings.magic_prompt)
        return self.magic

    def input_image(self, image: dict) -> bytes:
        """A remix's input file (`params["image"]`), checked against the sha256 the job names."""
        try:
            data = self.storage.get(image["key"])
        except NotFound:
            raise InputImageError(f"the remix input {image['sha256']} is no longer in storage") from None
        if sha256_hex(data) != image["sha256"]:
            raise InputImageError(f"the remix input at {image['key']} no longer has sha256 {image['sha256']}")
        return data

    def device_time(self, seconds: float) -> DeviceTime:
        """What one job of an attempt used, for its usage record (common.usage)."""
        return DeviceTime(gpu_kind=getattr(self.runner, "gpu_kind", "") or "unknown",
                          capacity=self.settings.worker.capacity, seconds=max(seconds, 0.0))


class InputImageError(ValueError):
    """A remix's input is gone or changed in storage: the job fails with this message."""


def spec_from_params(params: dict, locate: Callable[[dict], Path] | None = None,
                     read_image: Callable[[dict], bytes] | None = None):
    """The job's generation spec; `locate` finds each adapter's local file and `read_image` reads a remix's input
    (without them the spec only serves to compare jobs for co-batching)."""
    loras = tuple(LoraUse(sha256=lora["sha256"], scale=float(lora["scale"]), path=locate(lora) if locate else None)
                  for lora in params.get("loras", ()))
    image = params.get("image")
    init_image = None if image is None else InitImage(
        sha256=image["sha256"], strength=float(params["strength"]), data=read_image(image) if read_image else b"")
    return GenerationSpec(prompt_text=params["prompt_text"], width=params["width"], height=params["height"],
                          steps=params["steps"], mu=params["mu"], std=params["std"],
                          guidance_schedule=tuple(params["guidance_schedule"]), seeds=tuple(image_seeds(params)),
                          loras=loras, init_image=init_image)


def requeue(job_id: uuid.UUID, queue: str) -> None:
    """Hand a job that went back to `queued` to the broker now; if that fails, maintenance will."""
    try:
        dispatch([(job_id, queue)])
    except Exception as exc:  # noqa: BLE001 - Postgres down while marking: maintenance finds the job anyway
        log.warning("job %s: re-enqueue failed (%s); maintenance will retry", job_id, exc)


@dataclass
class Member:
    """One job of an attempt's batch (usually the only one): its claim and its heartbeat."""

    claim: job_states.Claim
    monitor: AttemptMonitor
    finishing: bool = False  # handed to the finisher thread, which stops the heartbeat once the job is complete

    @property
    def wants_stop(self) -> bool:
        return self.monitor.lease_lost.is_set() or self.monitor.cancel_requested.is_set()


def run_attempt(job_id: uuid.UUID, ctx: AttemptContext) -> str:
    """Returns what happened to `job_id`: skipped | succeeded | failed | queued | canceled | lease_lost, or
    finishing (its images are being stored on the finisher thread)."""
    wcfg = ctx.settings.worker
    with session_scope() as session:
        claim = job_states.claim(session, job_id=job_id, worker_id=ctx.worker_id, ttl_s=wcfg.lease_ttl_s)
    if claim is None:
        log.info("job %s: not claimable (finished, canceled or leased elsewhere): duplicate delivery ignored", job_id)
        metrics.JOBS.labels(outcome="skipped").inc()
        return "skipped"
    lead = _member(claim, ctx)  # heartbeating before anything else can take time
    members = [lead]
    t0 = time.perf_counter()
    outcome = "failed"
    ctx.current_job = job_id
    try:  # from here on every member's heartbeat is stopped however this ends (a running heartbeat keeps a lease)
        cached = _complete_from_cache(lead, ctx)
        if cached is not None:
            return cached
        members += [_member(c, ctx) for c in _claim_companions(claim, ctx)]
        if len(members) > 1:
            log.info("job %s: batched with %s", job_id, ", ".join(str(m.claim.job_id) for m in members[1:]))
        outcome = _generate_and_record(members, ctx, t0)
        return outcome
    finally:
        ctx.current_job = None
        for member in members:
            if not member.finishing:
                member.monitor.stop()


def _member(claim: job_states.Claim, ctx: AttemptContext) -> Member:
    wcfg = ctx.settings.worker
    metrics.ATTEMPTS_STARTED.labels(kind="first" if claim.attempt == 1 else "retry").inc()
    if claim.attempt == 1:
        metrics.QUEUE_WAIT.labels(queue=claim.queue).observe(claim.waited_s)
    monitor = AttemptMonitor(job_id=claim.job_id, token=claim.token, ttl_s=wcfg.lease_ttl_s,
                             heartbeat_s=wcfg.heartbeat_s, progress_interval_s=wcfg.progress_min_interval_s)
    monitor.start()
    return Member(claim, monitor)


def _claim_companions(lead: job_states.Claim, ctx: AttemptContext) -> list[job_states.Claim]:
    """Claim the queued jobs that may share `lead`'s batch (worker.co_batching); none when batching is off."""
    policy = ctx.batching
    if not policy.enabled or not ctx.settings.model.fast_path:
        return []
    lead_spec = _spec_or_none(lead.params)
    if lead_spec is None or not policy.batchable(lead_spec):
        return []
    claims: list[job_states.Claim] = []
    try:
        for look in range(2):
            if look:  # a second look after the window, when the batch is not full
                if policy.window_s <= 0 or len(lead_spec.seeds) + _images(claims) >= policy.max_batch:
                    break
                time.sleep(policy.window_s)
            with session_scope() as session:
                rows = job_states.queued_candidates(session, queue=lead.queue, exclude=lead.job_id,
                                                    limit=CANDIDATE_SCAN)
            candidates = [(job_id, spec) for job_id, params in rows if (spec := _spec_or_none(params))]
            for job_id in companions(lead_spec, candidates, policy, already=_images(claims)):
                with session_scope() as session:
                    claim = job_states.claim(session, job_id=job_id, worker_id=ctx.worker_id,
                                             ttl_s=ctx.settings.worker.lease_ttl_s)
                if claim is not None:  # else another worker took it first
                    claims.append(claim)
    except SQLAlchemyError as exc:  # no company this time; what was claimed runs
        log.warning("job %s: looking for batch company failed (%s); running without", lead.job_id, exc)
    return claims


def _cache_key(claim: job_states.Claim, ctx: AttemptContext) -> str | None:
    if not ctx.settings.worker.result_cache:
        return None
    runner = ctx.runner
    return result_cache.cache_key(tenant_id=claim.tenant_id, params=claim.params,
                                  model_id=getattr(runner, "model_id", ""), revision=getattr(runner, "revision", None),
                                  worker_config=getattr(runner, "config", ""))


def _complete_from_cache(m: Member, ctx: AttemptContext) -> str | None:
    """succeeded with copies of an earlier run's images (common/result_cache.py), or None: generate."""
    claim = m.claim
    key = _cache_key(claim, ctx)
    if key is None or m.wants_stop:
        return None
    metrics.RESULT_CACHE_LOOKUPS.inc()
    with session_scope() as session:
        entry = result_cache.find(session, key)
        source = (entry.job_id, list(entry.images)) if entry is not None else None
    if source is None:
        return None
    t0 = time.perf_counter()
    try:
        if not all(ctx.storage.exists(image["key"]) for image in source[1]):
            return None  # deleted since: generate, and the new run replaces the entry
        stored = []
        for image in source[1]:
            extension = image["key"].rsplit(".", 1)[-1]
            target = image_key(ctx.storage.prefix, claim.tenant_id, claim.job_id, image["index"], extension)
            ctx.storage.copy(image["key"], target)
            stored.append(job_states.StoredImage(**{**image, "key": target}))
        used = ctx.device_time(0.0)
        timings = {"cached": True, "cache_source_job": str(source[0]), "store_s": round(time.perf_counter() - t0, 3),
                   "gpu_seconds": 0.0, "gpu_kind": used.gpu_kind, "worker": ctx.worker_id, "attempt": claim.attempt}
        with session_scope() as session:
            job_states.complete(session, job_id=claim.job_id, token=claim.token, images=stored, timings=timings)
            _record_usage(session, claim, ctx, used, "succeeded", images=len(stored), cached=True)
    except LeaseLost:
        metrics.JOBS.labels(outcome="lease_lost").inc()
        return "lease_lost"
    except (StorageError, NotFound, SQLAlchemyError) as exc:  # the cache is an optimization: generate instead
        log.warning("job %s: result cache entry not usable (%s); generating", claim.job_id, exc)
        return None
    m.monitor.stop()
    metrics.JOBS.labels(outcome="succeeded").inc()
    metrics.IMAGES.inc(len(stored))
    metrics.RESULT_CACHE_HITS.inc()
    log.info("job %s: served from the result cache (images of job %s)", claim.job_id, source[0])
    return "succeeded"


def _preview_request(members: list[Member], specs: list, ctx: AttemptContext) -> PreviewRequest | None:
    """Previews of this generation into each member's preview slot (common/previews.py), when they are on: a
    member's first image row is its preview. A Redis error skips that preview (logged); the generation goes on."""
    every = ctx.settings.worker.preview_every_steps
    if not every:
        return None
    if ctx.preview_client is None:
        ctx.preview_client = redis_lib.Redis.from_url(ctx.settings.redis.url, socket_connect_timeout=1,
                                                      socket_timeout=1)
    rows, offset = [], 0
    for m, spec in zip(members, specs):
        rows.append((m.claim.job_id, offset))
        offset += len(spec.seeds)

    def deliver(step: int, jpegs: list[bytes]) -> None:
        try:
            for job_id, row in rows:
                preview_store.store(ctx.preview_client, job_id=job_id, step=step, jpeg=jpegs[row])
        except redis_lib.RedisError as exc:
            log.warning("job %s: preview at step %d not stored (%s)", rows[0][0], step, exc)

    return PreviewRequest(every=every, deliver=deliver)


def _images(claims: list[job_states.Claim]) -> int:
    return sum(len(image_seeds(c.params)) for c in claims)


def _spec_or_none(params: dict):
    try:
        return spec_from_params(params)
    except (KeyError, TypeError, ValueError):  # not ours to judge here: its own attempt will fail it properly
        return None


class MagicPromptFailed(ValueError):
    """A magic prompt `ON` got no valid caption from the enhancer: the job fails with this message."""


def _enhance_prompts(members: list[Member], ctx: AttemptContext) -> dict[uuid.UUID, str]:
    """Members whose request asks for a magic prompt not yet answered (`params.magic_prompt` still "ON"/"AUTO"):
    the enhancer's captions for all of them in one call (worker.pipeline.magic_prompt), each stored on its job,
    fenced by its lease, before anything is generated; so a re-run after a preemption, and the recipe, never
    depend on sampling the enhancer again. The same call also answers queued jobs' magic prompts, oldest first,
    up to `magic_prompt.batch` prompts (their answers are stored for when they run: the enhancer is far cheaper per
    prompt in a batch, docs/PERFORMANCE.md). An `ON` request without a valid caption fails; `AUTO` keeps its text
    prompt (stored as such). Returns the outcomes of the members that will not generate."""
    wanting = [m for m in members if isinstance(m.claim.params.get("magic_prompt"), str)]
    if not wanting:
        return {}
    magic = ctx.magic_prompt()
    if not magic.available:  # the API checked its own model; this worker has neither a head nor an endpoint
        log.warning("magic prompt requested but this worker has no prompt enhancer (no prompt_enhancer_head, no "
                    "LETTERPRESS_MAGIC_PROMPT__ENDPOINT)")
        return _answer_members(wanting, [None] * len(wanting), ctx,
                               "this worker has no prompt enhancer (no prompt_enhancer_head, no endpoint)")
    waiting: list[tuple[uuid.UUID, uuid.UUID, dict]] = []
    room = ctx.settings.magic_prompt.batch - len(wanting)
    if room > 0:
        with session_scope() as session:
            waiting = job_states.waiting_magic_prompts(session, limit=room, exclude=[m.claim.job_id for m in members])
    asks = [(m.claim.tenant_id, m.claim.params) for m in wanting] + [(t, p) for _, t, p in waiting]
    try:
        captions = magic.captions([EnhanceRequest(p["prompt"], p["width"], p["height"], p["seed"], str(t))
                                   for t, p in asks])
    except Exception as exc:  # noqa: BLE001 - the enhancer itself broke (e.g. out of memory): retried, not lost
        log.exception("magic prompt: the enhancer failed")
        return {m.claim.job_id: _record_failure(m.claim, ctx, exc, ctx.device_time(0.0), retryable=True)
                for m in wanting}
    for (job_id, _, params), caption in zip(waiting, captions[len(wanting):]):
        if caption is not None or params["magic_prompt"] == "AUTO":  # an ON without one fails when it runs
            with session_scope() as session:
                job_states.answer_waiting_magic_prompt(session, job_id=job_id, patch=_magic_patch(params, caption))
    return _answer_members(wanting, captions, ctx, "the prompt enhancer gave no valid caption in two samples")


def _answer_members(wanting: list[Member], captions: list, ctx: AttemptContext,
                    why_none: str) -> dict[uuid.UUID, str]:
    """Store each member's magic prompt answer on its job (fenced); an `ON` without a caption fails saying
    `why_none`. Returns the outcomes of the members that will not generate."""
    done: dict[uuid.UUID, str] = {}
    for m, caption in zip(wanting, captions):
        params = m.claim.params
        metrics.MAGIC_PROMPTS.labels(outcome="enhanced" if caption else "invalid").inc()
        if caption is None and params["magic_prompt"] == "ON":
            exc = MagicPromptFailed(f"magic prompt: {why_none}; submit with magic_prompt \"AUTO\" to fall back to "
                                    "the text prompt, or send a caption")
            done[m.claim.job_id] = _record_failure(m.claim, ctx, exc, ctx.device_time(0.0), retryable=False)
            continue
        patch = _magic_patch(params, caption)
        try:
            with session_scope() as session:
                job_states.patch_params(session, job_id=m.claim.job_id, token=m.claim.token, patch=patch)
        except LeaseLost:
            done[m.claim.job_id] = "lease_lost"
            continue
        m.claim = replace(m.claim, params={**params, **patch})
    return done


def _magic_patch(params: dict, caption) -> dict:
    """What a magic prompt's answer adds to the job's params: the caption the image is generated from (when there
    is one) and what was asked."""
    patch: dict = {"magic_prompt": {"mode": params["magic_prompt"], "prompt": params["prompt"],
                                    "enhanced": caption is not None}}
    if caption is not None:
        patch.update(caption=caption.model_dump(exclude_none=True), prompt_text=caption.to_prompt_text())
    return patch


def _generate_and_record(members: list[Member], ctx: AttemptContext, t0: float) -> str:
    """Generate every member's images in one call, then record each member's outcome. Returns the first
    member's outcome (the job Celery delivered); the others' are logged."""
    settled = _enhance_prompts(members, ctx)
    if settled:
        rest = [m for m in members if m.claim.job_id not in settled]
        outcome = _generate_and_record(rest, ctx, t0) if rest else None
        return settled.get(members[0].claim.job_id) or outcome
    def should_stop() -> bool:  # a batch stops for a drain, or when no member wants its images any more
        return ctx.drain.expired() or all(m.wants_stop for m in members)

    def on_step(done: int, total: int) -> None:
        for m in members:
            m.monitor.report(done, total)

    try:
        specs = [spec_from_params(m.claim.params, lambda lora, m=m: ctx.adapter_path(m.claim.tenant_id, lora),
                                  ctx.input_image) for m in members]
        previews = _preview_request(members, specs, ctx)
        extra = {"previews": previews} if previews is not None else {}
        if len(members) == 1:
            images = [ctx.runner.run(specs[0], on_step=on_step, should_stop=should_stop, **extra)]
        else:
            images = ctx.runner.run_batch(specs, on_step=on_step, should_stop=should_stop, **extra)
        t_gen = time.perf_counter()
    except LeaseLost:
        log.warning("job %s: lease lost; another attempt owns it, nothing recorded", members[0].claim.job_id)
        metrics.JOBS.labels(outcome="lease_lost").inc(len(members))
        return "lease_lost"
    except GenerationInterrupted:
        used = ctx.device_time((time.perf_counter() - t0) / len(members))
        return _for_each(members, lambda m: _after_interrupt(m.claim, ctx, m.monitor, used))
    except (StorageError, SQLAlchemyError) as exc:
        used = ctx.device_time((time.perf_counter() - t0) / len(members))
        return _for_each(members, lambda m, exc=exc: _record_failure(m.claim, ctx, exc, used, retryable=True))
    except Exception as exc:  # noqa: BLE001 - the generation itself raised: fail the job, keep serving
        if len(members) > 1:  # one bad job must not fail its companions: run them one by one, each on its own
            # (the failed call's time is billed to none of them: each job is billed for its own run below)
            log.warning("job %s: batch of %d failed (%s); running its jobs one by one", members[0].claim.job_id,
                        len(members), exc)
            return _for_each(members, lambda m: _generate_and_record([m], ctx, time.perf_counter()))
        log.exception("job %s: generation failed", members[0].claim.job_id)
        used = ctx.device_time(time.perf_counter() - t0)
        return _record_failure(members[0].claim, ctx, exc, used, retryable=False)

    def finish() -> str:
        def finish_one(m: Member, member_images: list) -> str:
            try:
                outcome = _finish(m, ctx, member_images, t0, t_gen, batch=len(members))
            finally:
                m.monitor.stop()
            # Celery logged the task as returning 'finishing'; this line says how the attempt really ended.
            log.info("job %s finished: %r", m.claim.job_id, outcome)
            return outcome

        outcomes = [finish_one(m, member_images) for m, member_images in zip(members, images)]
        return outcomes[0]

    if ctx.overlap_finish:
        for m in members:
            m.finishing = True
        FINISHER.submit(finish, name=f"finish-{members[0].claim.job_id}")
        return "finishing"
    return finish()


def _for_each(members: list[Member], record: Callable[[Member], str]) -> str:
    """Record every member's outcome, even when one of them fails; returns the first member's outcome."""
    outcomes, error = [], None
    for m in members:
        try:
            outcomes.append(record(m))
        except Exception as exc:  # noqa: BLE001 - the rest still get recorded; re-raised below
            error = error or exc
            outcomes.append("failed")
    if error is not None:
        raise error
    return outcomes[0]


def _finish(m: Member, ctx: AttemptContext, images: list, t0: float, t_gen: float, batch: int = 1) -> str:
    """Encode and store the images, then mark the job succeeded (fenced); failures are recorded like the
    generation's own. A job canceled while its batch ran ends canceled; one whose lease was lost stores nothing.
    The job is billed its share of the generation (`(t_gen - t0) / batch`) however it ends."""
    used = ctx.device_time((t_gen - t0) / batch)
    call = {"generate_s": round(t_gen - t0, 3), **({"batch": batch} if batch > 1 else {})}  # the whole call
    try:
        return _store_and_complete(m, ctx, images, used, call)
    except (StorageError, SQLAlchemyError) as exc:
        # infrastructure trouble: the attempt counts, the job goes back to the queue while attempts remain
        return _record_failure(m.claim, ctx, exc, used, retryable=True)
    except Exception as exc:  # noqa: BLE001 - encoding failed: fail the job, keep serving
        log.exception("job %s: storing the images failed", m.claim.job_id)
        return _record_failure(m.claim, ctx, exc, used, retryable=False)


@metrics.counts_outcome()
def _store_and_complete(m: Member, ctx: AttemptContext, images: list, used: DeviceTime, call: dict) -> str:
    """succeeded | canceled | lease_lost; raises what `_finish` records as a failure. Lease lost: another attempt
    owns the job, so this one records nothing, not even its usage."""
    claim, monitor = m.claim, m.monitor
    if monitor.lease_lost.is_set():
        log.warning("job %s: lease lost; another attempt owns it, nothing recorded", claim.job_id)
        return "lease_lost"
    params = claim.params
    try:
        if monitor.cancel_requested.is_set():
            with session_scope() as session:
                job_states.finish_canceled(session, job_id=claim.job_id, token=claim.token)
                _record_usage(session, claim, ctx, used, "canceled")
            return "canceled"
        t_store = time.perf_counter()
        stored = [_store(claim, ctx, index, seed, image)
                  for index, (seed, image) in enumerate(zip(image_seeds(params), images))]
        monitor.stop()
        timings = {**call, "store_s": round(time.perf_counter() - t_store, 3), "gpu_seconds": used.seconds,
                   "gpu_kind": used.gpu_kind, "worker": ctx.worker_id, "attempt": claim.attempt}
        with session_scope() as session:
            job_states.complete(session, job_id=claim.job_id, token=claim.token, images=stored, timings=timings)
            _record_usage(session, claim, ctx, used, "succeeded", images=len(stored))
            # a co-batched run's pixels equal a lone run's only up to rounding: only lone runs are reused
            if "batch" not in call and (key := _cache_key(claim, ctx)) is not None:
                result_cache.remember(session, key=key, tenant_id=claim.tenant_id, job_id=claim.job_id,
                                      images=[vars(image) for image in stored])
    except LeaseLost:
        log.warning("job %s: lease lost; another attempt owns it, nothing recorded", claim.job_id)
        return "lease_lost"
    metrics.IMAGES.inc(len(stored))
    metrics.observe_generation(params, ctx.runner.variant, used.seconds)
    return "succeeded"


def _record_usage(session, claim: job_states.Claim, ctx: AttemptContext, used: DeviceTime, outcome: str,
                  images: int = 0, cached: bool = False) -> None:
    """The attempt's usage row, in the transaction of its (fenced) outcome: both land or neither."""
    record_attempt(session, job_id=claim.job_id, attempt=claim.attempt, outcome=outcome, worker_id=ctx.worker_id,
                   used=used, images=images, cached=cached)
    # counted as written: a transaction that then fails to commit leaves the counter one attempt high
    metrics.DEVICE_SECONDS.labels(gpu_kind=used.gpu_kind, capacity=used.capacity).inc(used.seconds)


class Finisher:
    """One background finishing job at a time; `submit` first waits for the previous one (bounded memory)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], object], *, name: str) -> None:
        with self._lock:
            self.wait()

            def run() -> None:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - _finish records its own failures; this is the last resort
                    log.exception("%s: finishing failed", name)

            # Not a daemon: an interpreter exiting normally still waits for the job to be stored and completed.
            self._thread = threading.Thread(target=run, name=name, daemon=False)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job being finished (if any) is stored and recorded; False on timeout."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True


FINISHER = Finisher()


def wait_for_finishing(timeout: float | None = None) -> bool:
    return FINISHER.wait(timeout)


def _store(claim: job_states.Claim, ctx: AttemptContext, index: int, seed: int, image) -> job_states.StoredImage:
    params = claim.params
    fmt = FORMATS[params.get("output_format", "png")]
    data = encode_image(image, recipe(params, seed=seed, model_id=ctx.runner.model_id, revision=ctx.runner.revision),
                        fmt.name, params.get("output_quality"))
    key = image_key(ctx.storage.prefix, claim.tenant_id, claim.job_id, index, fmt.extension)
    ctx.storage.put(key, data, fmt.content_type)
    thumbnails.store_for(ctx.storage, key, image, ctx.settings.console.thumbnail_px)  # the console's gallery
    return job_states.StoredImage(index=index, seed=seed, key=key, sha256=sha256_hex(data), width=image.width,
                                  height=image.height, size_bytes=len(data))


@metrics.counts_outcome(queued="preempted")
def _after_interrupt(claim: job_states.Claim, ctx: AttemptContext, monitor: AttemptMonitor,
                     used: DeviceTime) -> str:
    if monitor.lease_lost.is_set():
        return "lease_lost"
    with session_scope() as session:
        if monitor.cancel_requested.is_set():
            job_states.finish_canceled(session, job_id=claim.job_id, token=claim.token)
            _record_usage(session, claim, ctx, used, "canceled")
            return "canceled"
        job_states.release_preempted(session, job_id=claim.job_id, token=claim.token)
        _record_usage(session, claim, ctx, used, "preempted")
        queue = job_states.get_job(session, claim.job_id).queue
    log.warning("job %s: interrupted by drain, returned to the queue", claim.job_id)
    requeue(claim.job_id, queue)
    return "queued"


@metrics.counts_outcome(queued="retried")
def _record_failure(claim: job_states.Claim, ctx: AttemptContext, exc: Exception, used: DeviceTime, *,
                    retryable: bool) -> str:
    error = {"type": "generation_error" if not retryable else "infrastructure_error",
             "message": str(exc)[:2000], "exception": exc.__class__.__name__}
    try:
        with session_scope() as session:
            status = job_states.fail(session, job_id=claim.job_id, token=claim.token, error=error,
                                     retryable=retryable)
            _record_usage(session, claim, ctx, used, "retried" if status == "queued" else "failed")
            queue = job_states.get_job(session, claim.job_id).queue
    except LeaseLost:
        return "lease_lost"
    if status == "queued":
        requeue(claim.job_id, queue)
    elif retryable and status == "failed":  # a retryable error on the last attempt
        metrics.ATTEMPTS_EXHAUSTED.inc()
    return status
