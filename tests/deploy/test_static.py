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

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
CPU = yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), Loader=yaml.BaseLoader)
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


def test_services_and_the_engine_stays_internal():
    services = COMPOSE["services"]
    assert set(services) == {"engine", "gateway", "prometheus", "grafana"}
    engine = services["engine"]
    assert "ports" not in engine, "the engine trusts request mm kwargs: never publish it"
    assert flag(engine, "--trust-request-mm-kwargs") == ""
    assert flag(engine, "--enable-prompt-tokens-details") == ""
    assert engine["networks"] == ["internal"]
    assert COMPOSE["networks"]["internal"]["internal"] is True
    gpu = engine["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert any(v.endswith("/.cache/huggingface") for v in engine["volumes"])


def test_ports_targets_and_dependencies_agree():
    services = COMPOSE["services"]
    engine_port = flag(services["engine"], "--port")
    assert services["engine"]["expose"] == [engine_port]
    gateway = services["gateway"]
    assert (
        gateway["environment"]["SPARSEVLM_GATEWAY_UPSTREAM_URL"] == f"http://engine:{engine_port}"
    )
    assert gateway["depends_on"]["engine"]["condition"] == "service_healthy"
    assert gateway["ports"][0].endswith(":8000")
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"][0] for job in PROM["scrape_configs"]
    }
    assert targets == {"gateway": "gateway:8000", "engine": f"engine:{engine_port}"}
    grafana = services["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" in grafana["environment"]
    for mount in grafana["volumes"] + services["prometheus"]["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
        else:
            assert source in COMPOSE["volumes"], source
    for mount in services["engine"]["volumes"]:
        assert mount.split(":")[0] in COMPOSE["volumes"]
    assert "api_keys" in COMPOSE["secrets"] and gateway["secrets"] == ["api_keys"]


def test_every_service_is_restarted_and_the_gateway_runs_its_checked_entry_point():
    for name, service in COMPOSE["services"].items():
        assert service.get("restart") in ("unless-stopped", "always"), name
    for dockerfile in ("Dockerfile", "deploy/Dockerfile.cpu"):
        cmd = re.search(r"^CMD (.+)$", (ROOT / dockerfile).read_text(), re.M)
        assert cmd and json.loads(cmd.group(1))[:3] == ["python3", "-m", "server"], dockerfile


def test_cpu_override_builds_the_bundled_model_image():
    assert set(CPU["services"]) <= set(COMPOSE["services"])
    engine = CPU["services"]["engine"]
    assert (ROOT / engine["build"]["dockerfile"]).exists()
    assert "--trust-request-mm-kwargs" in engine["command"]
    assert "ports" not in engine
    model = next(c.split("=", 1)[1] for c in engine["command"] if c.startswith("--model="))
    bundled = ROOT / model.removeprefix("/opt/sparsevlm/")  # the image copies the repo there
    assert (bundled / "config.json").exists(), model
    gateway = CPU["services"]["gateway"]["environment"]
    assert gateway["SPARSEVLM_GATEWAY_MODEL_DIR"] == model


def test_dashboard_structure():
    uids = {d["uid"] for d in DATASOURCES["datasources"]}
    assert DASH["uid"] and DASH["title"]
    ids = [p["id"] for p in DASH["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert "model" in variables and variables["model"]["datasource"]["uid"] in uids
    for panel in DASH["panels"]:
        assert panel["datasource"]["uid"] in uids
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"] and target["datasource"]["uid"] in uids
    exprs = " ".join(t["expr"] for p in DASH["panels"] for t in p["targets"])
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
