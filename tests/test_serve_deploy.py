"""deploy/: the Kubernetes manifests pass the Kubernetes JSON schemas (kubernetes-validate, strict) and agree
with the server: probe paths are routes the app serves without a key, ports match the server's --port, the
container args parse with ``lmforge serve``'s own parser, the grace period covers preStop + drain; the
Dockerfile runs as a non-root user with a HEALTHCHECK on /health."""

import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
kv = pytest.importorskip("kubernetes_validate")

from lmforge.cli import build_parser  # noqa: E402
from lmforge.serve.security import OPEN_PATHS  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / name).read_text())


def _serve_args(argv: list[str]):
    return build_parser().parse_args(["serve", *argv])


def _app_routes() -> set[str]:
    from lmforge.serve.app import ServerState, create_app
    from lmforge.serve.metrics import ServeMetrics
    from lmforge.serve.settings import ServeSettings

    gate = create_app(ServerState(ServeSettings(), ServeMetrics("m")), keys=None)
    return {r.path for r in gate.app.routes}


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "hpa.yaml"])
def test_manifest_matches_kubernetes_schema(name):
    kv.validate(_manifest(name), kv.latest_version(), strict=True)


def test_schema_validation_can_fail():
    bad = _manifest("deployment.yaml")
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


def test_deployment_probes_ports_and_drain_match_the_server():
    dep = _manifest("deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = _serve_args(c["args"])
    assert args.host == "0.0.0.0" and ports["http"] == args.port
    routes = _app_routes()
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in routes and get["path"] in OPEN_PATHS  # the kubelet sends no API key
        assert ports[get["port"]] == args.port
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + args.drain_timeout
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"] and c["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert args.model in mounts and str(Path(args.api_keys_file).parent) in mounts
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_service_and_hpa_point_at_the_deployment():
    dep, svc, hpa = _manifest("deployment.yaml"), _manifest("service.yaml"), _manifest("hpa.yaml")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    names = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert all(p["targetPort"] in names for p in svc["spec"]["ports"])
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_dockerfile_non_root_healthcheck_and_entrypoint():
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    user = re.search(r"^USER\s+(\S+)", joined, re.M).group(1).split(":")[0]
    assert user not in ("0", "root")
    exposed = int(re.search(r"^EXPOSE\s+(\d+)", joined, re.M).group(1))
    health = re.search(r"^HEALTHCHECK .*CMD (.*)$", joined, re.M).group(1)
    assert f"127.0.0.1:{exposed}/health" in health
    entry = yaml.safe_load(re.search(r"^ENTRYPOINT\s+(\[.*\])", joined, re.M).group(1))
    assert entry[:4] == ["python", "-m", "lmforge", "serve"]
    args = _serve_args(entry[4:])
    assert args.port == exposed and args.host == "0.0.0.0" and args.api_keys_file
