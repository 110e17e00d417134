"""Static checks of the deployment files (no Docker engine here): they agree with each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


class ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it: anchors and merge keys, and its ``!reset`` tag (kept as the
    value it resets to)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: loader.construct_mapping(node))
ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
CPU = yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), Loader=ComposeLoader)  # noqa: S506
ENGINES = sorted(name for name in COMPOSE["services"] if name.startswith("engine-"))
PROM = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
DASH = json.loads((ROOT / "deploy/grafana/dashboards/sparsevlm.json").read_text())
DATASOURCES = yaml.safe_load(
    (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
)


def flag(service: dict, name: str) -> str | None:
    for arg in service.get("command", []):
        if arg == name:
            return ""
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def worker_urls(router: dict) -> list[str]:
    """The router's ``--worker-urls`` (the values after the flag, up to the next flag)."""
    args = router["command"]
    start = args.index("--worker-urls") + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


def test_services_and_the_engines_stay_internal():
    services = COMPOSE["services"]
    assert ENGINES == ["engine-0", "engine-1"]
    assert set(services) == {*ENGINES, "router", "gateway", "prometheus", "grafana"}
    gpus = []
    for name in ENGINES:
        engine = services[name]
        assert "ports" not in engine, "the engine trusts request mm kwargs: never publish it"
        assert flag(engine, "--trust-request-mm-kwargs") == ""
        assert flag(engine, "--enable-prompt-tokens-details") == ""
        assert engine["networks"] == ["internal"]
        gpu = engine["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
        gpus.append(gpu["device_ids"])
        assert any(v.endswith("/.cache/huggingface") for v in engine["volumes"])
        assert engine["image"] == services["gateway"]["image"]  # one image, one build
    assert len({str(g) for g in gpus}) == len(ENGINES), "each replica reserves its own GPU"
    assert sum("build" in services[name] for name in ENGINES) == 1
    assert COMPOSE["networks"]["internal"]["internal"] is True
    router = services["router"]
    assert "ports" not in router and router["networks"] == ["internal"]
    assert router["entrypoint"] == ["vllm-router"] and router["image"] == "sparsevlm:latest"
    # follow-up turns reach the replica holding their prefix (docs/DEPLOY.md, "Replicas")
    assert flag(router, "--policy") == "consistent_hash"


def test_the_image_has_the_pinned_router():
    """The router service runs the project's image: it installs the router extra's exact pin
    (the one the dev install, and so tests/server/test_replicas.py, runs)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'^router = \["(vllm-router==[\d.]+)"\]$', pyproject, re.M).group(1)
    dev = pyproject[pyproject.index("\ndev = [") :]
    assert f'"{pin}"' in dev[: dev.index("\n]")], "the dev install runs the same router"
    assert f'"{pin}"' in (ROOT / "Dockerfile").read_text(), pin


def test_ports_targets_and_dependencies_agree():
    services = COMPOSE["services"]
    engines = []
    for name in ENGINES:
        port = flag(services[name], "--port")
        assert services[name]["expose"] == [port]
        engines.append(f"{name}:{port}")
    router = services["router"]
    assert worker_urls(router) == [f"http://{e}" for e in engines]
    assert {n: d["condition"] for n, d in router["depends_on"].items()} == {
        name: "service_healthy" for name in ENGINES
    }
    router_port, metrics_port = flag(router, "--port"), flag(router, "--prometheus-port")
    assert router["expose"] == [router_port, metrics_port]
    assert router["environment"]["HEALTH_PORT"] == router_port  # the image's HEALTHCHECK
    gateway = services["gateway"]
    assert (
        gateway["environment"]["SPARSEVLM_GATEWAY_UPSTREAM_URL"] == f"http://router:{router_port}"
    )
    assert gateway["depends_on"]["router"]["condition"] == "service_healthy"
    assert gateway["ports"][0].endswith(":8000")
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in PROM["scrape_configs"]
    }
    assert targets == {
        "gateway": ["gateway:8000"],
        "engine": engines,  # every replica: the dashboard sums over them
        "router": [f"router:{metrics_port}"],
    }
    grafana = services["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["environment"]
    for mount in grafana["volumes"] + services["prometheus"]["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
        else:
            assert source in COMPOSE["volumes"], source
    for name in ENGINES:
        for mount in services[name]["volumes"]:
            assert mount.split(":")[0] in COMPOSE["volumes"]
    assert "api_keys" in COMPOSE["secrets"] and gateway["secrets"] == ["api_keys"]


def test_every_service_is_restarted_and_the_gateway_runs_its_checked_entry_point():
    for name, service in COMPOSE["services"].items():
        assert service.get("restart") in ("unless-stopped", "always"), name
    for dockerfile in ("Dockerfile", "deploy/Dockerfile.cpu"):
        cmd = re.search(r"^CMD (.+)$", (ROOT / dockerfile).read_text(), re.M)
        assert cmd and json.loads(cmd.group(1))[:3] == ["python3", "-m", "server"], dockerfile


def test_cpu_override_builds_the_bundled_model_image():
    services = CPU["services"]
    assert set(services) <= set(COMPOSE["services"])
    assert sorted(n for n in services if n.startswith("engine-")) == ENGINES
    builds = [services[n]["build"] for n in ENGINES if "build" in services[n]]
    assert len(builds) == 1 and (ROOT / builds[0]["dockerfile"]).exists()
    cores = set()
    for name in ENGINES:
        engine = services[name]
        assert "--trust-request-mm-kwargs" in engine["command"]
        assert "ports" not in engine
        assert engine["deploy"] == {}  # `!reset`: no GPU reservation
        model = next(c.split("=", 1)[1] for c in engine["command"] if c.startswith("--model="))
        bundled = ROOT / model.removeprefix("/opt/sparsevlm/")  # the image copies the repo there
        assert (bundled / "config.json").exists(), model
        cores.add(engine["environment"]["VLLM_CPU_OMP_THREADS_BIND"])
    assert len(cores) == len(ENGINES), "each CPU replica binds its own cores"
    images = {services[n]["image"] for n in [*ENGINES, "router", "gateway"]}
    assert images == {"sparsevlm-cpu:latest"}
    gateway = services["gateway"]["environment"]
    assert gateway["SPARSEVLM_GATEWAY_MODEL_DIR"] == model


def test_dashboard_structure():
    uids = {d["uid"] for d in DATASOURCES["datasources"]}
    assert DASH["uid"] and DASH["title"]
    ids = [p["id"] for p in DASH["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert "model" in variables and variables["model"]["datasource"]["uid"] in uids
    replica = variables["replica"]  # the engine replicas, by Prometheus instance
    assert replica["datasource"]["uid"] in uids and replica["multi"] and replica["includeAll"]
    assert replica["query"]["query"].startswith("label_values(vllm:")
    assert replica["query"]["query"].endswith(", instance)")
    for panel in DASH["panels"]:
        assert panel["datasource"]["uid"] in uids
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"] and target["datasource"]["uid"] in uids
    exprs = " ".join(t["expr"] for p in DASH["panels"] for t in p["targets"])
    # every engine series is filtered by the replica variable, and aggregated over replicas
    for selector in re.findall(r"((?:vllm:|sparsevlm_engine_)\w+)(\{[^}]*\})?", exprs):
        assert 'instance=~"$replica"' in selector[1], selector
    for panel in DASH["panels"]:
        for target in panel["targets"]:
            assert re.match(r"(sum|max|histogram_quantile)\b", target["expr"]), target["expr"]
    for needed in (
        "sparsevlm_visual_tokens_saved_total",
        "sparsevlm_time_to_first_token_seconds_bucket",
        "vllm:time_to_first_token_seconds_bucket",
        "sparsevlm_requests_total",
        "sparsevlm_requests_in_flight",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "sparsevlm_prefill_flops_saved_total",
        "sparsevlm_engine_vision_cache_hits_total",
        "sparsevlm_engine_vision_cache_misses_total",
        "sparsevlm_prompt_tokens_cached_total",
        "vllm:request_success_total",  # per replica: how the router spreads conversations
        "vllm:prefix_cache_hits_total",
    ):
        assert needed in exprs, needed


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run(
        [hadolint, "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_static_rules():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM vllm/vllm-openai:v0\.32\.\d+$", text, re.M)
    assert re.search(r"^USER (?!root|0$)\S+$", text, re.M)
    assert "HEALTHCHECK" in text
    assert not re.search(r"\b(curl|wget)\b.*http", text), "no downloads outside the package index"
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / path).exists(), path
