"""The Kubernetes manifests (deploy/k8s): valid against the Kubernetes API schemas, offline
(kubernetes-validate from the package index, strict: unknown fields fail), and consistent with
each other: the router discovers exactly the engine pods, nothing but the router reaches them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
DOCS = [d for m in MANIFESTS for d in yaml.safe_load_all(m.read_text()) if d]
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")


def find(kind: str, name: str) -> dict:
    return next(d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name)


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def arg(c: dict, name: str) -> str:
    args = c.get("args", [])
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
    raise KeyError(name)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_for_the_kubernetes_api(manifest):
    out = subprocess.run([VALIDATE, "--strict", "--quiet", str(manifest)], capture_output=True)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def test_the_validator_rejects_what_the_api_would(tmp_path):
    bad = (ROOT / "deploy/k8s/gateway.yaml").read_text().replace("containerPort: 8000", "port: 1")
    (tmp_path / "bad.yaml").write_text(bad)
    out = subprocess.run([VALIDATE, "--strict", "--quiet", str(tmp_path / "bad.yaml")])
    assert out.returncode != 0


def test_router_discovers_the_engine_pods_and_the_gateway_uses_the_router():
    engine, router = find("Deployment", "sparsevlm-engine"), find("Deployment", "sparsevlm-router")
    labels = engine["spec"]["template"]["metadata"]["labels"]
    e, r = container(engine), container(router)
    assert "--service-discovery" in r["args"] and arg(r, "--policy") == "consistent_hash"
    assert dict([arg(r, "--selector").split("=", 1)]) == labels
    port = arg(e, "--port")
    assert arg(r, "--service-discovery-port") == port
    assert [p["containerPort"] for p in e["ports"]] == [int(port)]
    assert arg(r, "--service-discovery-namespace") == engine["metadata"]["namespace"]
    assert (
        "--trust-request-mm-kwargs" in e["args"] and "--enable-prompt-tokens-details" in e["args"]
    )
    assert e["resources"]["limits"]["nvidia.com/gpu"] == 1  # one GPU per replica

    # the router's service account may watch pods in that namespace
    r_spec = router["spec"]["template"]["spec"]
    binding = find("RoleBinding", "sparsevlm-router-pods")
    assert binding["subjects"][0]["name"] == r_spec["serviceAccountName"]
    role = find("Role", binding["roleRef"]["name"])
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"]
    assert r_spec["containers"][0]["ports"][0]["containerPort"] == int(arg(r, "--port"))

    service = find("Service", "sparsevlm-router")
    assert service["spec"]["selector"] == router["spec"]["template"]["metadata"]["labels"]
    env = {v["name"]: v["value"] for v in container(find("Deployment", "sparsevlm-gateway"))["env"]}
    url = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert env["SPARSEVLM_GATEWAY_UPSTREAM_URL"] == url
    images = {container(d)["image"] for d in DOCS if d["kind"] == "Deployment"}
    assert images == {"sparsevlm:latest"}  # the one image of ../../Dockerfile


def test_only_the_router_reaches_the_engines():
    engine_labels = find("Deployment", "sparsevlm-engine")["spec"]["template"]["metadata"]["labels"]
    for d in DOCS:  # no Service in front of the engines
        if d["kind"] == "Service":
            assert d["spec"]["selector"] != engine_labels, d["metadata"]["name"]
    policy = next(
        d for d in DOCS
        if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"]["matchLabels"] == engine_labels
    )  # fmt: skip
    router = find("Deployment", "sparsevlm-router")["spec"]["template"]["metadata"]["labels"]
    pods = [p["podSelector"]["matchLabels"] for p in policy["spec"]["ingress"][0]["from"]
            if "podSelector" in p]  # fmt: skip
    assert pods == [router] and policy["spec"]["policyTypes"] == ["Ingress"]
