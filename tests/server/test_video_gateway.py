"""Videos through the gateway (issue 19): accepted containers, limits, remote videos, and usage
that is exact against the real vLLM engine (the session's Qwen2.5-VL fixture engine)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from server.config import SettingsError, load_settings
from server.launch import build_parser, engine_command
from server.launch import gateway_settings as serve_settings
from tests.conftest import image_data_url, shapes_video, video_bytes
from tests.gateway_fixtures import LiveGateway, gateway_settings, start_gateway
from tests.plugin.conftest import shapes_image
from tests.smoke.test_families import FORMULAS
from tests.vllm_server import VllmServer, free_port

MODEL = "qwen2.5-vl"
PART = "messages[0].content[0].video_url"
HOST = "127.0.0.2"  # the loopback media server the remote-enabled gateway may fetch from
MIME = {"mp4v": "video/mp4", "VP80": "video/webm", "MJPG": "video/x-msvideo"}


def clip(frames: int = 16, fps: float = 4.0, fourcc: str = "mp4v", seed: int = 0) -> bytes:
    return video_bytes(shapes_video(seed, frames), fps, fourcc)


def data_url(raw: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def video_body(*urls: str, sparsity: dict | None = None, image: str | None = None) -> dict:
    parts: list[dict] = [{"type": "video_url", "video_url": {"url": u}} for u in urls]
    if image is not None:
        parts.append({"type": "image_url", "image_url": {"url": image}})
    parts.append({"type": "text", "text": "What moves in the video?"})
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}
    return body | ({"sparsity": sparsity} if sparsity is not None else {})


def chat(gw: LiveGateway, body: dict, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {gw.api_key}"}
    return httpx.post(
        f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=300, **kw
    )


def usage(gw: LiveGateway, body: dict) -> dict:
    r = chat(gw, body)
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def error(r: httpx.Response, status: int, param: str = PART) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == status, err
    return err["message"]


# --- settings and launch: no engine ---------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_VIDEO_BYTES", "0"),
        ("MAX_VIDEO_FRAMES", "0"),
        ("MAX_VIDEO_SECONDS", "0"),
        ("MAX_VIDEO_SECONDS", "long"),
        ("MAX_VIDEOS", "-1"),
        ("VIDEO_DECODE_TIMEOUT_S", "0"),
    ],
)
def test_bad_video_settings_name_their_variable(monkeypatch, name, value):
    monkeypatch.setenv(f"SPARSEVLM_GATEWAY_{name}", value)
    with pytest.raises(SettingsError, match=f"SPARSEVLM_GATEWAY_{name}:"):
        load_settings()


def test_video_settings_defaults_and_environment(monkeypatch):
    s = load_settings()
    assert (s.max_videos, s.max_video_bytes, s.max_video_frames, s.max_video_seconds) == (
        1, 10 * 1024 * 1024, 9000, 300.0
    )  # fmt: skip
    monkeypatch.setenv("SPARSEVLM_GATEWAY_MAX_VIDEOS", "0")
    monkeypatch.setenv("SPARSEVLM_GATEWAY_MAX_VIDEO_SECONDS", "12.5")
    s = load_settings()
    assert s.max_videos == 0 and s.max_video_seconds == 12.5


def test_a_bad_video_setting_stops_the_gateway_with_exit_2():
    env = {**os.environ, "SPARSEVLM_GATEWAY_MAX_VIDEO_FRAMES": "many"}
    out = subprocess.run(
        [sys.executable, "-m", "server", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "SPARSEVLM_GATEWAY_MAX_VIDEO_FRAMES" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("family", "video"), [("qwen2.5-vl", True), ("llava-1.5", False)])
def test_serve_gives_video_checkpoints_a_video_limit(fixture_models, family, video):
    model = str(fixture_models[family])
    args = build_parser().parse_args(["--model", model, "--max-videos", "2"])
    cmd = engine_command(model, 1234, "m", args)
    limits = json.loads(cmd[cmd.index("--limit-mm-per-prompt") + 1])
    assert limits == ({"image": 4, "video": 2} if video else {"image": 4})
    settings = serve_settings(args, model, "http://127.0.0.1:1")
    assert settings.max_videos == (2 if video else 1)  # the gateway lets the same number through


# --- the engine, and gateways in front of it ------------------------------------------------
@pytest.fixture(scope="module")
def video_engine(qwen_server: VllmServer) -> VllmServer:
    """The session's Qwen2.5-VL plugin engine (it takes videos): no engine of its own."""
    return qwen_server


@pytest.fixture(scope="module")
def media_server() -> Iterator[str]:
    """Loopback server for remote videos (at 127.0.0.2, which only `gw` may reach)."""
    routes = {
        "/clip.mp4": (clip(), "video/mp4"),
        "/clip.bin": (clip(8, 4.0, "VP80"), "application/octet-stream"),
        "/big.mp4": (b"\0" * 300_000, "video/mp4"),
        "/page": (b"<html>not a video</html>", "text/html"),
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            payload, ctype = routes.get(self.path, (b"missing", "text/plain"))
            self.send_response(200 if self.path in routes else 404)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer((HOST, free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def gw(video_engine) -> Iterator[LiveGateway]:
    """Remote media allowed from the loopback media server; video bytes capped at 100 kB."""
    settings = gateway_settings(
        video_engine.url,
        Path(video_engine.model),
        remote_image_hosts=[HOST],
        remote_image_allow_http=True,
        remote_image_allowed_networks=[f"{HOST}/32"],  # test-only: the loopback media server
        max_video_bytes=100_000,
    )
    live = start_gateway(settings)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def tight(video_engine) -> Iterator[LiveGateway]:
    """Small video limits, remote media off (the default)."""
    settings = gateway_settings(
        video_engine.url,
        Path(video_engine.model),
        max_video_bytes=20_000,
        max_video_frames=20,
        max_video_seconds=5.0,
        max_image_pixels=300 * 300,
    )
    live = start_gateway(settings)
    yield live
    live.stop()


# --- usage is exact -------------------------------------------------------------------------
@pytest.mark.engine
@pytest.mark.parametrize(
    ("frames", "fps", "fourcc", "sparsity", "kept"),
    [
        (16, 4.0, "mp4v", {"video_keep_ratio": 0.25}, 144),  # 8 frames sampled at 2 fps: 576
        (8, 4.0, "VP80", {"video_tokens": 100, "method": "temporal"}, 100),  # 4 frames: 288
        (30, 10.0, "MJPG", {"keep_ratio": 0.5}, 216),  # 6 frames: 432; videos take `keep_ratio`
    ],
)
def test_video_usage_is_exact_against_the_unpruned_request(gw, frames, fps, fourcc, sparsity, kept):
    url = data_url(clip(frames, fps, fourcc), MIME[fourcc])
    full = usage(gw, video_body(url))
    pruned = usage(gw, video_body(url, sparsity=sparsity))
    original = full["prompt_tokens_details"]["multimodal_tokens"]["video"]  # vLLM's own count
    assert full["visual_tokens"] == {"original": original, "kept": original, "saved": 0}
    assert pruned["prompt_tokens_details"]["multimodal_tokens"]["video"] == kept
    assert pruned["visual_tokens"] == {"original": original, "kept": kept, "saved": original - kept}
    assert full["prompt_tokens"] - pruned["prompt_tokens"] == original - kept
    assert pruned["sparsity"]["video_tokens"] == sparsity.get("video_tokens")


@pytest.mark.engine
def test_mixed_image_and_video_usage(gw):
    video = data_url(clip(16, 4.0))
    image = image_data_url(shapes_image(1).resize((300, 200)))
    full = usage(gw, video_body(video, image=image))
    budgets = {"visual_tokens": 40, "video_tokens": 100}
    pruned = usage(gw, video_body(video, image=image, sparsity=budgets))
    mm = full["prompt_tokens_details"]["multimodal_tokens"]
    assert mm["image"] == FORMULAS[MODEL](300, 200)
    original = mm["image"] + mm["video"]
    assert full["visual_tokens"] == {"original": original, "kept": original, "saved": 0}
    assert pruned["prompt_tokens_details"]["multimodal_tokens"] == {"image": 40, "video": 100}
    assert pruned["visual_tokens"] == {"original": original, "kept": 140, "saved": original - 140}
    assert full["prompt_tokens"] - pruned["prompt_tokens"] == original - 140


@pytest.mark.engine
def test_streamed_usage_and_metrics_count_videos(gw):
    url = data_url(clip(16, 4.0))
    body = video_body(url, sparsity={"video_tokens": 64}) | {
        "stream": True, "stream_options": {"include_usage": True}
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {gw.api_key}"}
    before = video_metric(gw, "sparsevlm_visual_tokens_saved_total")
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=300) as r:  # fmt: skip
        chunks = [json.loads(line[5:]) for line in r.iter_lines()
                  if line.startswith("data:") and "[DONE]" not in line]  # fmt: skip
    visual = chunks[-1]["usage"]["visual_tokens"]
    assert visual == {"original": 576, "kept": 64, "saved": 512}
    assert video_metric(gw, "sparsevlm_visual_tokens_saved_total") - before == 512
    assert video_metric(gw, "sparsevlm_visual_tokens_original_total") >= 576


def video_metric(gw: LiveGateway, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if line.startswith(name + "{") and 'modality="video"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- limits ---------------------------------------------------------------------------------
@pytest.mark.engine
def test_limits(tight):
    small = clip(8, 4.0)  # 2 s, 8 frames, ~6 kB: within every limit
    assert chat(tight, video_body(data_url(small))).status_code == 200
    message = error(chat(tight, video_body(data_url(clip(16, 4.0, "MJPG")))), 413)
    assert "more than the limit of 20000" in message
    message = error(chat(tight, video_body(data_url(clip(24, 24.0)))), 413)
    assert "24 frames, more than the limit of 20" in message
    message = error(chat(tight, video_body(data_url(clip(12, 2.0)))), 413)
    assert "lasts 6.0 s, more than the limit of 5 s" in message
    big_frames = video_bytes(shapes_video(0, 4, size=(320, 320)), 4.0)
    message = error(chat(tight, video_body(data_url(big_frames))), 413)
    assert "video frame has 320x320" in message
    message = error(chat(tight, video_body(data_url(small), data_url(small))), 400, "messages")
    assert "2 videos in one request, the limit is 1" in message


@pytest.mark.engine
@pytest.mark.parametrize(
    ("url", "words"),
    [
        (data_url(b"definitely not a video" * 50), "not a decodable video"),
        (image_data_url(shapes_image(0)).replace("image/png", "video/mp4"), "not a decodable"),
        (data_url(clip(1, 1.0)), "cannot sample frames"),  # one frame: vLLM's sampler fails
        (data_url(clip(8), "video/jpeg"), "unsupported video type 'video/jpeg'"),
        (image_data_url(shapes_image(0)), "unsupported video type 'image/png'"),
        ("data:video/mp4,notbase64", "must be base64-encoded"),
        ("file:///etc/passwd", "expected a data: URL"),
        ("https://example.com/a.mp4", "remote video URLs are disabled"),
    ],
)
def test_bad_videos_are_400_naming_the_part(tight, url, words):
    assert words in error(chat(tight, video_body(url)), 400)


@pytest.mark.engine
@pytest.mark.parametrize(
    ("sparsity", "param"),
    [
        ({"video_tokens": 0}, "sparsity.video_tokens"),
        ({"video_keep_ratio": 1.5}, "sparsity.video_keep_ratio"),
        ({"video_tokens": "8"}, "sparsity.video_tokens"),
        ({"visual_tokens": 8, "method": "random", "temporal_threshold": 0.9},
         "sparsity.temporal_threshold"),
        ({"method": "off", "video_tokens": 8}, "sparsity"),
    ],
)  # fmt: skip
def test_bad_video_knob_fields_are_400_naming_the_field(tight, sparsity, param):
    body = video_body(data_url(clip(8)), sparsity=sparsity)
    error(chat(tight, body), 400, param)


# --- remote videos --------------------------------------------------------------------------
@pytest.mark.engine
@pytest.mark.parametrize("path", ["/clip.mp4", "/clip.bin"])
def test_an_allowed_remote_video_is_fetched_by_the_gateway(gw, media_server, path):
    remote = usage(gw, video_body(media_server + path, sparsity={"video_tokens": 50}))
    raw = clip() if path == "/clip.mp4" else clip(8, 4.0, "VP80")
    local = usage(gw, video_body(data_url(raw), sparsity={"video_tokens": 50}))
    assert remote["visual_tokens"] == local["visual_tokens"]
    assert remote["visual_tokens"]["kept"] == 50


@pytest.mark.engine
@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/big.mp4", 413, "the video is larger than the limit of 100000 bytes"),
        ("/page", 400, "not a decodable video"),
        ("/nothing", 400, "the video server answered HTTP 404"),
    ],
)
def test_bad_remote_videos_are_refused(gw, media_server, path, status, words):
    assert words in error(chat(gw, video_body(media_server + path)), status)


@pytest.mark.engine
def test_remote_video_hosts_follow_the_image_allow_list(gw):
    message = error(chat(gw, video_body("http://127.0.0.1:9/clip.mp4")), 400)
    assert "video host '127.0.0.1' is not in this server's allowed hosts" in message
