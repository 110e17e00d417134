"""A real Prometheus scrapes the live gateway and engine; every dashboard query returns data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import image_data_url
from tests.gateway_fixtures import API_KEY
from tests.plugin.conftest import shapes_image
from tests.vllm_server import free_port

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "deploy/grafana/dashboards/sparsevlm.json").read_text())
PNG_ENV = "SPARSEVLM_DASHBOARD_PNG"  # also write the rendering there (docs/img/dashboard.png)


@pytest.fixture(scope="module")
def prometheus(gateway, llava_server, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (scripts/ci-system-deps.sh installs it)")
        pytest.skip("Debian's prometheus package is not installed")
    work = tmp_path_factory.mktemp("prometheus")
    targets = {"gateway": gateway.url, "engine": llava_server.url}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [urlparse(url).netloc]}]}
            for job, url in targets.items()
        ],
    }
    (work / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "prometheus.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _traffic(gateway, rounds: int = 4) -> None:
    """Single questions under several knobs, and a two-turn conversation each round."""
    knobs = [
        {"visual_tokens": 64, "scope": "turn"},
        {"keep_ratio": 0.5},
        None,
        {"visual_tokens": 32, "method": "random"},
    ]
    h = {"Authorization": f"Bearer {API_KEY}"}
    img = image_data_url(shapes_image(7))
    for r in range(rounds):
        for i, knob in enumerate(knobs):
            first = {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": img}},
                    {"type": "text", "text": f"What color is shape {r}{i}?"},
                ],
            }
            turns = [[first]]
            if i == 0:  # and a follow-up turn: the prefix cache serves the first one
                turns.append([first, {"role": "assistant", "content": "red"}])
                turns[1].append({"role": "user", "content": "And its shape?"})
            for messages in turns:
                body = {
                    "model": "llava-1.5",
                    "messages": messages,
                    "max_tokens": 3,
                    "stream": i % 2 == 0,
                    **({"sparsity": knob} if knob else {}),
                }
                with httpx.stream(
                    "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=h, timeout=120
                ) as resp:
                    resp.read()
        time.sleep(1.5)


def _queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"].replace("$model", ".*").replace("$replica", ".*"))
        for panel in DASHBOARD["panels"]
        for target in panel["targets"]
    ]


def test_every_dashboard_query_returns_data(prometheus, gateway, llava_server):
    _traffic(gateway)
    time.sleep(3)
    empty = []
    for title, expr in _queries():
        r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", (title, expr, r)
        if not r["data"]["result"]:
            empty.append((title, expr))
    assert not empty, f"panels with no data: {empty}"
    var = DASHBOARD["templating"]["list"][0]["query"]["query"]
    metric = var.removeprefix("label_values(").split(",")[0]
    r = httpx.get(f"{prometheus}/api/v1/series", params={"match[]": metric}).json()
    assert {s["model"] for s in r["data"]} == {"llava-1.5"}
    # the replica variable lists the engine instances Prometheus scrapes (here: the one)
    var = next(v for v in DASHBOARD["templating"]["list"] if v["name"] == "replica")
    metric = var["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0]
    r = httpx.get(f"{prometheus}/api/v1/series", params={"match[]": metric}).json()
    assert {s["instance"] for s in r["data"]} == {urlparse(llava_server.url).netloc}

    png = ROOT / ".cache" / "dashboard.png"
    render(prometheus, png)
    assert png.stat().st_size > 10_000
    if os.environ.get(PNG_ENV):
        shutil.copy(png, ROOT / os.environ[PNG_ENV])


def render(prometheus: str, out: Path) -> None:
    """The dashboard's panels drawn with matplotlib from Prometheus query_range data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = DASHBOARD["panels"]
    end = time.time()
    start = end - 90
    cols = 2
    rows = (len(panels) + 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.0 * rows))
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            expr = target["expr"].replace("$model", ".*").replace("$replica", ".*")
            data = httpx.get(
                f"{prometheus}/api/v1/query_range",
                params={"query": expr, "start": start, "end": end, "step": 2},
                timeout=10,
            ).json()["data"]["result"]
            for series in data:
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = target["legendFormat"]
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                ax.plot(xs, ys, label=label)
        ax.set_title(f"{panel['title']} ({panel['fieldConfig']['defaults']['unit']})", fontsize=9)
        ax.set_xlabel("seconds", fontsize=8)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("SparseVLM serving dashboard — rendered from a live Prometheus (test traffic)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
