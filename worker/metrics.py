"""The worker's Prometheus metrics, served by each worker process on its own port (`worker.metrics_port`;
`letterpress worker` gives the N-th GPU worker base + N). Every name and its alert: docs/OPERATIONS.md.

Labels stay low-cardinality: outcome, queue, preset, size (`1024x1024`), variant (fast | stock). Never a job id,
a prompt or a tenant.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger(__name__)

# outcomes of one job's attempt, as recorded in Postgres
JOBS = Counter("letterpress_worker_jobs_total", "Job attempts ended on this worker, by outcome: succeeded, failed, "
               "retried (back to the queue after an error), preempted (returned by a drain), canceled, lease_lost, "
               "skipped (a duplicate delivery)", ["outcome"])
ATTEMPTS_EXHAUSTED = Counter("letterpress_worker_attempts_exhausted_total",
                             "Jobs failed for good: a retryable error on their last attempt, or their worker lost on "
                             "every attempt (found by maintenance)")
ATTEMPTS_STARTED = Counter("letterpress_worker_attempts_started_total",
                           "Attempts claimed by this worker: a job's first, or a retry after an error, a lost "
                           "worker or a drain", ["kind"])
LEASES_EXPIRED = Counter("letterpress_maintenance_leases_expired_total",
                         "Running jobs whose worker stopped renewing the lease (killed, frozen, preempted without "
                         "notice), found by a maintenance pass of this process")
REENQUEUED = Counter("letterpress_maintenance_reenqueued_total",
                     "Queued jobs whose broker message was lost (Redis down at submit, a flushed list), sent again")
QUEUE_WAIT = Histogram("letterpress_worker_queue_wait_seconds",
                       "Time from a job's creation to its first attempt starting", ["queue"],
                       buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600))
GENERATION = Histogram("letterpress_worker_generation_seconds",
                       "Generation time of one job (its share of the call), by preset, size and variant",
                       ["preset", "size", "variant"],
                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300))
STEP = Histogram("letterpress_worker_step_seconds", "Generation time per denoising step of one job",
                 ["preset", "size", "variant"],
                 buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
DEVICE_SECONDS = Counter("letterpress_worker_gpu_seconds_total",
                         "Generation seconds billed to jobs (the usage ledger, common.usage), by device kind and "
                         "capacity", ["gpu_kind", "capacity"])
IMAGES = Counter("letterpress_worker_images_total", "Images stored by this worker")
MAGIC_PROMPTS = Counter("letterpress_worker_magic_prompts_total",
                        "Magic prompts answered by the prompt enhancer: enhanced (a valid caption) or invalid "
                        "(none in two samples: the job failed, or kept its text prompt under AUTO)", ["outcome"])
RESULT_CACHE_LOOKUPS = Counter("letterpress_worker_result_cache_lookups_total",
                               "Jobs that could be answered from the result cache (an explicit seed, cache on), "
                               "looked up; hits / lookups is the hit rate")
RESULT_CACHE_HITS = Counter("letterpress_worker_result_cache_hits_total",
                            "Jobs completed with copies of an earlier identical run's images, without generating "
                            "(common/result_cache.py)")
ADAPTER_SWITCHES = Counter("letterpress_worker_adapter_switches_total",
                           "Generations that ran with other adapters than the one before (LoRA on, off or other "
                           "adapters, worker/pipeline/adapters.py)")
ADAPTER_LOADS = Counter("letterpress_worker_adapter_loads_total",
                        "Adapter files loaded into the transformer (eager) or copied into a hot-swap slot (compiled)")
ADAPTER_SWITCH_SECONDS = Counter("letterpress_worker_adapter_switch_seconds_total",
                                 "Time spent switching adapters (loading, copying into slots, enabling, disabling)")
WARMUP = Gauge("letterpress_worker_warmup_seconds", "Time the pipeline took to load and warm at start")
READY = Gauge("letterpress_worker_ready", "1 once the pipeline is warm and the worker takes jobs")
LEASE_RENEWALS = Counter("letterpress_worker_lease_renewals_total", "Heartbeats that renewed a job's lease")
LEASE_LOSSES = Counter("letterpress_worker_lease_losses_total",
                       "Attempts that found their lease taken over (the job runs elsewhere)")
# The webhook delivery worker serves only its own metrics (and its process's), not the GPU worker's zeros.
WEBHOOK_REGISTRY = CollectorRegistry()
ProcessCollector(registry=WEBHOOK_REGISTRY)
WEBHOOK_DELIVERIES = Counter("letterpress_webhook_deliveries_total",
                             "Webhook delivery attempts, by outcome: success, retry, disable (the endpoint was "
                             "disabled), refused (the SSRF guard)", ["outcome"], registry=WEBHOOK_REGISTRY)
WEBHOOK_DELIVERY_SECONDS = Histogram("letterpress_webhook_delivery_seconds",
                                     "Time of one delivery attempt's HTTP call",
                                     buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
                                     registry=WEBHOOK_REGISTRY)
DRAINING = Gauge("letterpress_worker_draining", "1 while the worker drains (SIGTERM or a spot notice)")


def counts_outcome(**renamed: str) -> Callable:
    """Count the string a per-job recording function returns in JOBS (`queued` can mean retried or preempted:
    the caller says which)."""
    def wrap(record: Callable[..., str]) -> Callable[..., str]:
        @functools.wraps(record)
        def counted(*args, **kwargs) -> str:
            outcome = record(*args, **kwargs)
            JOBS.labels(outcome=renamed.get(outcome, outcome)).inc()
            return outcome
        return counted
    return wrap


def observe_generation(params: dict, variant: str, seconds: float) -> None:
    labels = {"preset": params.get("preset", ""), "size": f"{params.get('width')}x{params.get('height')}",
              "variant": variant}
    GENERATION.labels(**labels).observe(seconds)
    if params.get("steps"):
        STEP.labels(**labels).observe(seconds / params["steps"])


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Start the scrape endpoint (a daemon thread); 0: none. A port in use is logged, not fatal: the worker's job
    is to generate, and a second worker on one host with the same port is a configuration slip to fix."""
    if not port:
        return
    try:
        start_http_server(port, registry=registry)
        log.info("metrics on :%d/metrics", port)
    except OSError as exc:
        log.error("metrics port %d not served (%s): set LETTERPRESS_WORKER__METRICS_PORT", port, exc)


def watch_gpu() -> None:
    """GPU memory (this process's, from torch) and the device's utilisation (NVML, `nvidia-ml-py`), read at scrape
    time; nothing when there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        return
    memory = Gauge("letterpress_worker_gpu_memory_bytes", "GPU memory held by this worker's tensors", ["kind"])
    memory.labels(kind="allocated").set_function(torch.cuda.memory_allocated)
    memory.labels(kind="peak").set_function(torch.cuda.max_memory_allocated)
    memory.labels(kind="total").set_function(lambda: torch.cuda.get_device_properties(0).total_memory)
    try:
        import pynvml

        pynvml.nvmlInit()
        # CUDA_VISIBLE_DEVICES pins this process to one GPU, named as NVML names it (an index or a UUID)
        visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
        handle = (pynvml.nvmlDeviceGetHandleByUUID(visible) if visible.startswith(("GPU-", "MIG-"))
                  else pynvml.nvmlDeviceGetHandleByIndex(int(visible)))
    except Exception as exc:  # noqa: BLE001 - no NVML (a driver without it): memory still reported
        log.warning("GPU utilisation not reported: NVML unavailable (%s)", exc)
        return
    Gauge("letterpress_worker_gpu_utilization_ratio", "Fraction of the last sample period the GPU was busy "
          "(NVML)").set_function(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
