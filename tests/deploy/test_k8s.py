"""The Kubernetes manifests (deploy/k8s): every overlay renders with kustomize (`kubectl kustomize`), every object
validates against the Kubernetes API schemas in strict mode (kubernetes-validate) and the KEDA objects against
KEDA's CRD schemas (@kubernetes-models/keda, tests/deploy/schemas), and the properties the platform relies on hold.
No cluster is involved: what this cannot see (a real KEDA scaling a real pool) is in docs/OPERATIONS.md."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from common.settings import settings_from_env
from tests.support import REPO

K8S = REPO / "deploy" / "k8s"
KEDA_CHECK = REPO / "tests" / "deploy" / "schemas"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
KUBERNETES = "1.30"  # the oldest minor the manifests promise (autoscaling/v2, policy/v1, batch/v1 ttl)


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (with its built-in kustomize) is not installed: `make server-deps` installs it")
    done = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def keda_check(objects: list[dict]) -> subprocess.CompletedProcess:
    if not (KEDA_CHECK / "node_modules").exists():
        pytest.fail("the KEDA schemas are not installed: `make server-deps` runs `npm ci` in tests/deploy/schemas")
    return subprocess.run(["node", str(KEDA_CHECK / "validate.mjs")], input=json.dumps(objects), capture_output=True,
                          text=True)


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay):
    objects = render(overlay)
    core = [o for o in objects if not o["apiVersion"].startswith("keda.sh/")]
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    keda = [o for o in objects if o["apiVersion"].startswith("keda.sh/")]
    if keda:
        done = keda_check(keda)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_validators_refuse_a_broken_object():
    """The checks above can fail: a misspelt field and a wrongly typed KEDA field are refused."""
    objects = render("spot-gpu")
    api = copy.deepcopy(by_kind(objects, "Deployment")["letterpress-api"])
    api["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, KUBERNETES, strict=True)
    scaled = copy.deepcopy(by_kind(objects, "ScaledObject")["letterpress-worker-gpu"])
    scaled["spec"]["minReplicaCount"] = "zero"
    done = keda_check([scaled])
    assert done.returncode == 1 and "minReplicaCount must be integer" in done.stdout, done.stdout


def test_spot_gpu_workers_scale_from_zero_on_redis_and_postgres_and_drain_in_time():
    objects = render("spot-gpu")
    worker = by_kind(objects, "Deployment")["letterpress-worker-gpu"]
    scaled = by_kind(objects, "ScaledObject")["letterpress-worker-gpu"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0 and scaled["spec"]["maxReplicaCount"] >= 1
    from common.broker import INTERACTIVE_QUEUES

    lists = [t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"]
    assert lists == list(INTERACTIVE_QUEUES.values())  # every interactive lane scales the workers
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert "status = 'queued'" in triggers["postgresql"]["metadata"]["query"]
    auths = by_kind(objects, "TriggerAuthentication")
    assert {t["authenticationRef"]["name"] for t in triggers.values()} <= auths.keys()

    pod = worker["spec"]["template"]["spec"]
    assert container(worker)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t.get("key") == "cloud.google.com/gke-spot" for t in pod["tolerations"])
    env = {e["name"]: e["value"] for e in container(worker).get("env", [])}
    config = by_kind(objects, "ConfigMap")["letterpress"]["data"]
    drain_grace = float(env.get("LETTERPRESS_WORKER__DRAIN_GRACE_S", config["LETTERPRESS_WORKER__DRAIN_GRACE_S"]))
    assert drain_grace < 30  # inside GKE's 30 s spot notice
    assert pod["terminationGracePeriodSeconds"] > drain_grace + 30  # room to store the last images after the grace
    assert env["LETTERPRESS_WORKER__SPOT_NOTICE_URL"].startswith("http://metadata.google.internal/")
    # its usage is priced as spot, at prices the settings accept
    settings = settings_from_env({**config, **env, "LETTERPRESS_SECRET_KEY": "s" * 32})
    assert settings.worker.capacity == "spot" and settings.pricing.spot_per_gpu_hour
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "letterpress-models"  # no re-download


def test_single_node_runs_fixed_workers_without_keda():
    objects = render("single-node")
    assert not [o for o in objects if o["apiVersion"].startswith("keda.sh/")]
    assert not by_kind(objects, "HorizontalPodAutoscaler")
    assert by_kind(objects, "Deployment")["letterpress-worker-gpu"]["spec"]["replicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_metrics_ports_and_network_policy(overlay):
    objects = render(overlay)
    deployments = by_kind(objects, "Deployment")
    api = container(deployments["letterpress-api"])
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert by_kind(objects, "Job")["letterpress-migrate"]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "letterpress", "migrate"]
    config = by_kind(objects, "ConfigMap")["letterpress"]["data"]
    ports = {"letterpress-worker-gpu": config["LETTERPRESS_WORKER__METRICS_PORT"],
             "letterpress-maintenance": config["LETTERPRESS_WORKER__METRICS_PORT"],
             "letterpress-webhooks": config["LETTERPRESS_WEBHOOKS__METRICS_PORT"]}
    policy = by_kind(objects, "NetworkPolicy")["letterpress-workers"]
    allowed = {str(p["port"]) for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    for name, port in ports.items():
        template = deployments[name]["spec"]["template"]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == port
        assert port in {str(p["containerPort"]) for p in container(deployments[name])["ports"]}
        assert template["metadata"]["labels"]["letterpress/role"] == "worker" and port in allowed


def test_the_postgres_trigger_query_runs_on_the_schema(stack_env):
    """KEDA runs this query as is: it must parse and plan against the migrated schema and return one number."""
    from sqlalchemy import text

    from common.db import session_scope

    scaled = by_kind(render("spot-gpu"), "ScaledObject")["letterpress-worker-gpu"]
    (query,) = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "postgresql"]
    with session_scope() as session:
        rows = session.execute(text(query)).all()
    assert len(rows) == 1 and len(rows[0]) == 1 and rows[0][0] >= 0, rows
