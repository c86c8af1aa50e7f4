"""One settings object for every process (pydantic-settings, `LETTERPRESS_` prefix, nested groups).

Nested fields use a double underscore: `LETTERPRESS_DATABASE__URL`, `LETTERPRESS_STORAGE__URL`,
`LETTERPRESS_MODEL__ID`, `LETTERPRESS_WORKER__LEASE_TTL_S`, ...
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, NonNegativeFloat, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET = "dev-insecure-secret"
ENV_PREFIX = "LETTERPRESS_"
NESTED_DELIMITER = "__"


class DatabaseSettings(BaseModel):
    url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/letterpress"
    pool_size: int = 5
    max_overflow: int = 10
    # a request that finds every pooled connection busy this long is answered 503 at once (overload), instead
    # of queueing behind the others
    pool_timeout_s: float = Field(5.0, gt=0)
    # Postgres ends a session left idle inside a transaction this long (0: never). A process frozen mid-transaction
    # (SIGSTOP, a VM pause) would otherwise hold its row and advisory locks until it wakes, and lease recovery of
    # its job would wait for it. Our transactions are milliseconds; long statements (COPY) are not "idle".
    idle_in_transaction_timeout_s: float = Field(60.0, ge=0)


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    # Seconds a delivered-but-unacked Celery message stays invisible before Redis redelivers it. Postgres leases
    # recover lost work much sooner (see docs/RELIABILITY.md); this only bounds the worst case.
    visibility_timeout_s: int = 3600


class StorageSettings(BaseModel):
    # `s3://bucket/prefix` or `file:///absolute/dir`
    url: str = "file://./.letterpress/storage"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    presign_ttl_s: int = 900
    max_retries: int = 5


class ModelSettings(BaseModel):
    # Hub id or local path. Empty: the tiny random-weight model under LETTERPRESS_HOME when there is no GPU,
    # `ideogram-ai/ideogram-4-nf4` when there is one.
    id: str = ""
    # auto | bf16 | nf4 | nf4-dequant | fp8 | int8 | fp32 (worker/pipeline/loading.py; auto never picks fp8 or int8)
    variant: str = "auto"
    revision: str | None = None
    hf_token: SecretStr | None = None
    hf_home: str | None = None
    offline: bool = False
    # Use the worker's equivalent fast path (tight text padding, no mask when unpadded, cached projections).
    fast_path: bool = True
    # Regional torch.compile of the repeated blocks, warmed up at worker start. None (auto): on for CUDA, where it
    # measured 1.52x the eager fast path at 1024² (docs/PERFORMANCE.md); off on CPU.
    compile: bool | None = None
    # Longest prompt, in tokens of the chat-formatted prompt text (prompt or caption JSON). Not in the model's
    # config: it is the `max_sequence_length` argument of the diffusers Ideogram4Pipeline call (its default, and
    # the length the model was published with). The worker passes it to the pipeline; the API refuses longer
    # prompts at validation (common.prompt_tokens).
    max_sequence_length: int = Field(2048, ge=1)


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    default_preset: str = "V4_DEFAULT_20"
    max_width: int = 2048
    max_height: int = 2048
    min_side: int = 256
    max_metadata_bytes: int = 4096
    page_size_max: int = 200
    # URL prefixes (`s3://shared-prompts/public/`) any tenant may name as input_url besides its own storage prefix;
    # read with the storage credentials. JSON list: LETTERPRESS_API__INPUT_URL_ALLOW='["s3://bucket/prefix/"]'
    input_url_allow: list[str] = []
    # Request bodies (api/limits.py): refused with 413 before they are parsed, counted as they stream in.
    max_body_bytes: int = Field(64 * 1024, ge=1024)  # every route but the batch upload
    max_batch_json_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # POST /v1/batches as JSON {"items": [...]}
    max_batch_upload_bytes: int = Field(1024 * 1024 * 1024, ge=1024)  # POST /v1/batches multipart (spooled to disk)
    # Remix inputs (common/input_images.py): POST /v1/uploads and images read or fetched at submit
    input_image_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    input_image_max_pixels: int = Field(4096 * 4096, ge=64 * 64)
    input_image_fetch_timeout_s: float = Field(15.0, gt=0)
    # Requests in flight at once in one API process (admission control, api/limits.py); one more is a 503 with
    # Retry-After at once, so an overload sheds load instead of queueing work whose callers have given up
    max_in_flight: int = Field(32, ge=1)
    # How long a submitted job's broker send waits for the submits after it, to share one thread hop, Redis pipeline
    # and enqueue mark with them (api/send_queue.py); 0: send at once
    send_linger_ms: float = Field(20.0, ge=0, le=1000)
    # Server-Sent Events (api/event_streams.py): how often a stream reads its job, the keep-alive comment's period
    # when nothing changes, the longest a stream lasts (the client reconnects with Last-Event-ID), and the streams
    # one API process keeps open at once (one more: 429)
    events_poll_s: float = Field(0.5, gt=0)
    events_heartbeat_s: float = Field(15.0, gt=0)
    events_max_s: float = Field(600.0, gt=0)
    events_max_streams: int = Field(512, ge=1)
    # uvicorn worker processes of `letterpress api`; each has two database pools (the ORM's and api/job_store's,
    # database.pool_size + max_overflow connections each), so Postgres sees up to workers x 2 x that
    # (docs/PERFORMANCE.md, "Front door under load")
    workers: int = Field(1, ge=1)
    # Batch ingests (validation + COPY) running at once in one API process, overall and per tenant; more: 429
    max_ingests: int = Field(4, ge=1)
    max_ingests_per_tenant: int = Field(2, ge=1)
    # A client address presenting this many wrong keys in a minute is refused (429) for wrong_key_block_s, except
    # with a key that worked lately (api/wrong_keys.py); 0: off
    wrong_keys_per_minute: int = Field(20, ge=0)
    wrong_key_block_s: int = Field(60, ge=1)


class BatchingSettings(BaseModel):
    """Dynamic batching (worker.co_batching): off by default, see docs/PERFORMANCE.md "Dynamic batching"."""

    enabled: bool = False
    max_batch: int = Field(4, ge=1)  # images per batch
    window_s: float = Field(0.0, ge=0)  # how long a claimed job waits for company (0: only what is waiting now)
    max_pixels: int = Field(512 * 512, ge=1)  # larger images run alone


class WorkerSettings(BaseModel):
    lease_ttl_s: int = 30
    heartbeat_s: float = 5.0
    progress_min_interval_s: float = 1.0
    max_attempts: int = 3
    maintenance_period_s: int = 15
    # Seconds the running job may keep going after a drain starts (SIGTERM or spot notice).
    drain_grace_s: float = 90.0
    # A preview of a running job every this many steps (worker/pipeline/previews.py; the event stream carries it);
    # 0: none. Off by default: docs/PERFORMANCE.md ("Previews") has what one costs.
    preview_every_steps: int = Field(0, ge=0)
    spot_notice_url: str | None = None
    spot_poll_s: float = 5.0
    # Jobs re-enqueued by maintenance when queued longer than this without a claim (lost enqueues).
    requeue_after_s: int = 60
    concurrency: int = 1
    # Torch threads of a CPU worker (None: torch's default, every core). Several CPU workers on one host must
    # share the cores: at the default each spins on all of them, and two tiny-model workers on 2 cores ran a job
    # in 0.65 s instead of 0.07 s (docs/PERFORMANCE.md, "CPU workers"). `letterpress worker` sets it for its own.
    cpu_threads: int | None = Field(default=None, ge=1)
    # Prometheus scrape port of a worker process (0: none). `letterpress worker` gives its N-th worker this + N,
    # so each GPU worker of a host is its own target (docs/OPERATIONS.md).
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    # How this worker's GPU is bought: its usage records are priced at `pricing.spot_per_gpu_hour` or
    # `pricing.on_demand_per_gpu_hour` (common.usage). The spot-gpu Kubernetes overlay sets `spot`.
    capacity: Literal["on_demand", "spot"] = "on_demand"
    # A request run before with the same explicit seed, by the same tenant, on a worker configured the same, gets
    # copies of that run's images instead of a generation (common/result_cache.py)
    result_cache: bool = True
    batching: BatchingSettings = BatchingSettings()


class BatchSettings(BaseModel):
    """Knobs for batches (common.batches, worker.feeder), `LETTERPRESS_BATCHES__*`."""

    max_lines: int = 1_000_000
    max_errors_reported: int = 1000  # line errors listed in a 422 or in the batch's `invalid`
    insert_chunk: int = 5000  # rows per COPY
    # Messages kept in the Redis "batch" list. Small on purpose: a few jobs a worker is enough to keep GPUs busy
    # between feeder passes, and all else waits in Postgres (flat Redis memory, interactive work never behind it).
    feed_depth: int = 8
    feed_period_s: float = 0.2
    # Do not top the batch queue up while interactive jobs wait in the broker: batch work fills idle capacity.
    interactive_first: bool = True
    # Send a batch's items one adapter group after another (each in line order), so workers keep their adapters
    # loaded: docs/PERFORMANCE.md "Adapter switches" measures what it saves
    group_by_adapter: bool = True
    finalize_retry_s: float = 120.0  # a batch left in `finalizing` this long (its finalizer died) is redone
    # Priority lanes (common/fair_share.py): a batch's share of the batch lane against its tenant's other batches,
    # and a tenant's share against other tenants (the weight of its highest-priority batch), as these weights.
    # The defaults give a high batch 4 turns to a low one's 1; nothing starves.
    priority_weights: dict[str, float] = {"high": 4.0, "normal": 2.0, "low": 1.0}

    @field_validator("priority_weights")
    @classmethod
    def _three_positive_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        if set(weights) != {"high", "normal", "low"} or min(weights.values()) <= 0:
            raise ValueError("priority_weights needs a positive weight for each of high, normal and low")
        return weights


class MagicPromptSettings(BaseModel):
    """Magic prompt (worker/pipeline/magic_prompt.py), `LETTERPRESS_MAGIC_PROMPT__*`. Without an endpoint the
    worker's own model answers, when it has a `prompt_enhancer_head`."""

    # An OpenAI-compatible server (`http://vllm:8000/v1`) hosting the same Qwen3-VL model with its LM head, for
    # fleets that keep a separate LLM pool; empty: the worker's own enhancer
    endpoint: str = ""
    model: str = ""  # the model name that server knows
    api_key: SecretStr = SecretStr("")
    timeout_s: float = Field(60.0, gt=0)
    temperature: float = Field(1.0, ge=0)  # diffusers' PROMPT_UPSAMPLE_TEMPERATURE
    max_new_tokens: int = Field(1024, ge=16)
    cache_entries: int = Field(4096, ge=0)  # per worker process: (tenant, prompt, size, seed, ...) -> caption
    # Prompts one enhancer call answers: those of the jobs the worker runs, then queued jobs' still unanswered ones
    # (oldest first), whose captions are stored for when they run; 1: only the running jobs'
    batch: int = Field(16, ge=1)


class AdapterSettings(BaseModel):
    """LoRA adapters (common/adapters.py, worker/pipeline/adapters.py), `LETTERPRESS_ADAPTERS__*`."""

    max_file_bytes: int = Field(2 * 1024**3, ge=1024)  # POST /v1/adapters upload (spooled to disk), or a uri's read
    max_per_job: int = Field(3, ge=1)  # `loras` entries a job may name
    max_scale: float = Field(2.0, gt=0)  # |scale| of one adapter
    max_rank: int = Field(64, ge=1)  # larger ranks are refused; with compile, every hot-swap slot holds this rank
    # Server-side directories whose `.safetensors` files a registration may name as `file:///...` (operators
    # pre-stage adapters there); empty: no server path may be named
    path_allow: list[str] = []
    # Let a registration name hf://org/repo[@revision]/file.safetensors (fetched with the server's Hub token into
    # model.hf_home's cache; offline mode: only what the cache holds)
    hub: bool = False
    # The worker's disk cache of adapter files (sha256-verified, least recently used evicted past cache_bytes);
    # empty: `{LETTERPRESS_HOME}/adapters`
    cache_dir: str = ""
    cache_bytes: int = Field(20 * 1024**3, ge=0)
    # Adapters kept loaded in the transformer at once (eager); switching between resident ones costs no load
    resident: int = Field(4, ge=1)
    # A compiled worker's hot-swap slots (worker/pipeline/adapters.py), each a zero LoRA of max_rank over every
    # Linear layer until a job's adapter is copied in; None: max_per_job; 0: this worker serves no adapters
    compiled_slots: int | None = Field(None, ge=0)


class LimitsSettings(BaseModel):
    """Per-key request rates (api/rate_limits.py) and per-tenant quotas (common/quotas.py), `LETTERPRESS_LIMITS__*`."""

    # Requests a second (or minute, hour...) one API key may make to /v1, in the `limits` library's notation
    # ("100/second", "6000/minute"); shared by every API process through Redis; empty: no limit
    requests_per_key: str = "100/second"
    # Jobs a tenant may have queued or running at once (batch items count once fed), unless an admin set the
    # tenant's own (common/quotas.py); 0: no limit
    max_active_jobs: int = Field(0, ge=0)
    # Images a tenant may have made in the last 24 hours plus queued, unless an admin set its own; 0: no limit
    max_images_per_day: int = Field(0, ge=0)

    @field_validator("requests_per_key")
    @classmethod
    def _a_rate(cls, value: str) -> str:
        if value:
            from limits import parse

            try:
                parse(value)
            except ValueError:
                raise ValueError(f"not a rate like 100/second or 6000/minute: {value!r}") from None
        return value


class WebhookSettings(BaseModel):
    allow_loopback: bool = False
    # Prometheus scrape port of the delivery worker (0: none); apart from the GPU workers' 9400 + N
    metrics_port: int = Field(default=9410, ge=0, le=65535)
    timeout_s: float = 15.0
    retry_schedule_s: list[float] = Field(default_factory=lambda: [0, 5, 300, 1800, 7200, 18000, 36000, 36000])
    jitter: float = 0.1


class ConsoleSettings(BaseModel):
    """The web console at /ui (api/console/): sign-in sessions and the gallery."""

    enabled: bool = True
    session_ttl_s: int = Field(12 * 3600, ge=60)  # idle time that ends a console session (each request renews it)
    # `Secure` on the session cookie: "auto" sets it when the request came over https (X-Forwarded-Proto counts
    # only where uvicorn trusts the proxy), "always" everywhere, "never" nowhere
    secure_cookie: Literal["auto", "always", "never"] = "auto"
    gallery_page: int = Field(48, ge=1, le=200)  # tiles a gallery page (and each infinite-scroll step) shows
    thumbnail_px: int = Field(384, ge=64, le=1024)  # the longer side of a gallery thumbnail


class PricingSettings(BaseModel):
    """Price per GPU-hour by GPU kind, for the usage and cost reports (common.usage), `LETTERPRESS_PRICING__*`.

    Keys are matched against the GPU's device name, case-insensitively, the longest matching key winning:
    `{"A100": 1.2, "A100-SXM4-80GB": 1.6, "*": 2.0}` prices an "NVIDIA A100-SXM4-80GB" at 1.6; `*` matches any kind;
    a CPU worker's kind is `cpu`. Seconds of a kind no key matches are reported as unpriced, never as free.
    Costs are estimates at today's prices: changing a price re-prices past usage.
    """

    currency: str = "USD"
    on_demand_per_gpu_hour: dict[str, NonNegativeFloat] = {}
    spot_per_gpu_hour: dict[str, NonNegativeFloat] = {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, extra="ignore")

    env: Literal["dev", "test", "prod"] = "dev"
    home: Path = Path("./.letterpress")
    # Encrypts the secrets the database holds (common/secrets_at_rest.py). Rotating it: the old key goes into
    # previous_secret_keys (JSON list) until `letterpress secrets reencrypt` has run (docs/SECURITY.md)
    secret_key: SecretStr = SecretStr(DEV_SECRET)
    previous_secret_keys: list[SecretStr] = []
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    storage: StorageSettings = StorageSettings()
    model: ModelSettings = ModelSettings()
    api: ApiSettings = ApiSettings()
    worker: WorkerSettings = WorkerSettings()
    batches: BatchSettings = BatchSettings()
    webhooks: WebhookSettings = WebhookSettings()
    adapters: AdapterSettings = AdapterSettings()
    magic_prompt: MagicPromptSettings = MagicPromptSettings()
    limits: LimitsSettings = LimitsSettings()
    pricing: PricingSettings = PricingSettings()
    console: ConsoleSettings = ConsoleSettings()
    # LETTERPRESS_API_URL: the API's public base URL (webhook payloads' links, the CLI's target); default
    # http://{api.host}:{api.port}
    api_url: str | None = None

    @property
    def tiny_model_dir(self) -> Path:
        """Where the tiny random-weight model lives when no model is configured and there is no GPU."""
        return Path(self.home).expanduser().resolve() / "models" / "tiny"

    @property
    def adapter_cache_dir(self) -> Path:
        """The worker's disk cache of adapter files (worker/adapter_files.py)."""
        return Path(self.adapters.cache_dir or Path(self.home) / "adapters").expanduser().resolve()

    @property
    def public_api_url(self) -> str:
        return (self.api_url or f"http://{self.api.host}:{self.api.port}").rstrip("/")

    @model_validator(mode="after")
    def _refuse_default_secret_in_prod(self) -> "Settings":
        if self.env == "prod" and self.secret_key.get_secret_value() == DEV_SECRET:
            raise ValueError("LETTERPRESS_SECRET_KEY must be set to a real secret when LETTERPRESS_ENV=prod")
        return self


_installed: Settings | None = None


def get_settings() -> Settings:
    """This process's settings: the ones `use_settings` installed, else read once from the environment."""
    return _installed if _installed is not None else _from_environment()


@lru_cache
def _from_environment() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    """Read the environment again (the CLI changes it before starting the local stack)."""
    _from_environment.cache_clear()


@contextmanager
def use_settings(settings: Settings) -> Iterator[Settings]:
    """Make `settings` this process's settings inside the block, then put the previous ones back: how tests point
    the in-process code at their own stack without writing the process environment. Engines are cached per
    database URL (common.db), so a block with another URL gets its own."""
    global _installed
    previous, _installed = _installed, settings
    try:
        yield settings
    finally:
        _installed = previous


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings as a process started with `env` (only `LETTERPRESS_*` keys; nested groups split on `__`) would
    read them, without touching this process's environment."""
    values: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        *groups, field = key[len(ENV_PREFIX):].lower().split(NESTED_DELIMITER)
        node = values
        for group in groups:
            node = node.setdefault(group, {})
        # complex fields (lists, objects) come as JSON in the environment, as pydantic-settings reads them
        node[field] = json.loads(value) if value.lstrip()[:1] in ("[", "{") else value
    return Settings(**values)


def hf_env(model: ModelSettings) -> dict[str, str]:
    """Environment the Hugging Face libraries read (token, cache, offline mode)."""
    env = {}
    if model.hf_token is not None:
        env["HF_TOKEN"] = model.hf_token.get_secret_value()
    if model.hf_home:
        env["HF_HOME"] = model.hf_home
    if model.offline:
        env["HF_HUB_OFFLINE"] = "1"
    return {**{k: v for k, v in os.environ.items() if k in ("HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE")}, **env}


def hub_cache_dir(model: ModelSettings) -> str | None:
    """The Hugging Face Hub cache under `model.hf_home` (or HF_HOME); None: the libraries' default."""
    home = hf_env(model).get("HF_HOME")
    return str(Path(home).expanduser() / "hub") if home else None
