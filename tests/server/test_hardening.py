"""The operator's first hour (issue 17), over HTTP against real processes: keys from the
environment and flags, caps that hold, remote images fetched safely, failures mid-stream,
slow clients, engine supervision."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server.launch import EngineFailed, wait_healthy
from tests.gateway_fixtures import gateway_settings, start_gateway
from tests.plugin.conftest import shapes_image
from tests.server.test_gateway import MODEL, messages
from tests.vllm_server import free_port

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]


def chat(url: str, body: dict, key: str = "", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120, **kw)


def body(**extra) -> dict:
    return {"model": MODEL, "messages": messages(1), "max_tokens": 2, **extra}


# --- keys, and bad settings at start-up -------------------------------------------------------
def run_gateway(env: dict[str, str], upstream: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full = {**os.environ, "SPARSEVLM_GATEWAY_UPSTREAM_URL": upstream, **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port)],
        env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if proc.poll() is not None:
            break
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    return proc, url


@pytest.mark.parametrize(
    ("value", "accepted"),
    [("mykey", ["mykey"]), ("a, b", ["a", "b"]), ('["j1", "j2"]', ["j1", "j2"])],
)
def test_keys_from_the_environment(llava_server, value, accepted):
    proc, url = run_gateway({"SPARSEVLM_GATEWAY_API_KEYS": value}, llava_server.url)
    try:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        for key in accepted:
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_empty_variables_mean_unset_as_compose_passes_them(llava_server):
    empty = {f"SPARSEVLM_GATEWAY_{n}": "" for n in ("DEFAULT_SPARSITY", "MAX_VISUAL_TOKENS")}
    proc, url = run_gateway(empty, llava_server.url)
    try:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_keys_from_a_file(llava_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# operators' keys\nfile-key-1\n\n  file-key-2  \n")
    proc, url = run_gateway({"SPARSEVLM_GATEWAY_API_KEYS_FILE": str(keys)}, llava_server.url)
    try:
        for key, status in (("file-key-1", 200), ("file-key-2", 200), ("# operators' keys", 401)):
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == status, (key, r.text)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SPARSEVLM_GATEWAY_API_KEYS": '["a",'}, "SPARSEVLM_GATEWAY_API_KEYS"),
        ({"SPARSEVLM_GATEWAY_API_KEYS_FILE": "/nonexistent/keys"}, "cannot read /nonexistent"),
        ({"SPARSEVLM_GATEWAY_MAX_VISUAL_TOKENS": "0"}, "SPARSEVLM_GATEWAY_MAX_VISUAL_TOKENS"),
        ({"SPARSEVLM_GATEWAY_DEFAULT_SPARSITY": '{"visual_tokens": -1}'}, "DEFAULT_SPARSITY"),
        ({"SPARSEVLM_GATEWAY_REMOTE_IMAGE_ALLOWED_NETWORKS": "10.0.0.0/33"}, "is not a network"),
    ],
)
def test_bad_settings_are_one_clear_line_and_exit_2(env, words):
    proc, _ = run_gateway(env, "http://127.0.0.1:9")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and words in err, err[-2000:]
    assert "Traceback" not in err


def test_serve_checks_settings_before_starting_the_engine(tmp_path):
    cli = [sys.executable, "-m", "sparse_plugin.cli", "serve", "--api-keys-file", "/nope"]
    t0 = time.monotonic()
    out = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot read /nope" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 30  # no engine was started


def test_serve_takes_keys_and_exits_when_its_engine_dies(fixture_models, tmp_path):
    """`sparsevlm serve --api-key ...` on a real engine; kill the engine, serve exits 1 fast and
    leaves none of the engine's processes behind."""
    port = free_port()
    cli = [sys.executable, "-m", "sparse_plugin.cli", "serve", "--model",
           str(fixture_models["llava-1.5"]), "--port", str(port), "--api-key", "k1",
           "--api-key", "k2"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cli, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc, timeout=600)
        except EngineFailed as exc:
            pytest.fail(f"{exc}: {log.read_text()[-3000:]}")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        for key in ("k1", "k2"):
            r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        engine = next(p for p in children(proc.pid) if "api_server" in cmdline(p))
        group = os.getpgid(engine)
        os.kill(engine, signal.SIGKILL)
        t0 = time.monotonic()
        code = proc.wait(timeout=30)
        assert code == 1 and time.monotonic() - t0 < 10
        assert "the vLLM engine exited" in log.read_text()
        for _ in range(30):  # SIGKILL is delivered at once; the exits take a moment
            left = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True)
            if not left.stdout.strip():
                break
            time.sleep(0.5)
        assert not left.stdout.strip(), f"engine processes left behind: {left.stdout}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --- caps -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def capped(llava_server):
    settings = gateway_settings(llava_server.url, Path(llava_server.model), max_visual_tokens=32)
    live = start_gateway(settings)
    yield live
    live.stop()


@pytest.mark.parametrize(
    "sparsity",
    [None, {"visual_tokens": 64}, {"keep_ratio": 1.0}, {"keep_ratio": 0.5, "method": "random"},
     {"method": "off"}],
)  # fmt: skip
def test_the_cap_holds_for_every_way_of_asking(capped, sparsity):
    r = chat(capped.url, body(**({"sparsity": sparsity} if sparsity else {})), capped.api_key)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["visual_tokens"] == {"original": 576, "kept": 32, "saved": 544}
    assert usage["sparsity"]["max_visual_tokens"] == 32  # usage says what was applied


def test_a_cap_above_the_ask_changes_nothing(capped):
    r = chat(capped.url, body(sparsity={"visual_tokens": 16}), capped.api_key)
    assert r.json()["usage"]["visual_tokens"]["kept"] == 16


def test_opting_out_can_be_refused(llava_server):
    live = start_gateway(gateway_settings(llava_server.url, None, allow_unpruned=False))
    try:
        r = chat(live.url, body(sparsity={"method": "off"}), live.api_key)
        assert r.status_code == 400 and r.json()["error"]["param"] == "sparsity.method"
        r = chat(live.url, body(sparsity={"visual_tokens": 8}), live.api_key)
        assert r.status_code == 200
        assert r.json()["usage"]["sparsity"]["visual_tokens"] == 8
    finally:
        live.stop()


# --- remote images --------------------------------------------------------------------------
HOST = "127.0.0.2"  # the allowed image server; 127.0.0.1 stays a refused loopback address


def png_bytes(size: tuple[int, int] = (336, 336)) -> bytes:
    buf = io.BytesIO()
    shapes_image(3).resize(size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    port = free_port()
    png = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            routes = {
                "/img.png": (200, png, {}),
                "/hop": (302, b"", {"Location": f"http://{HOST}:{port}/img.png"}),
                "/to-loopback": (302, b"", {"Location": f"http://127.0.0.1:{port}/img.png"}),
                "/to-metadata": (302, b"", {"Location": "http://169.254.169.254/latest/meta"}),
                "/loop": (302, b"", {"Location": "/loop"}),
                "/big": (200, b"\x89PNG" + b"0" * 3_000_000, {}),
                "/big-stream": (200, b"\x89PNG" + b"0" * 3_000_000, {"stream": "1"}),
                "/text": (200, b"<html>not an image</html>", {"Content-Type": "text/html"}),
                "/missing": (404, b"no", {}),
            }
            if self.path == "/slow":
                time.sleep(5)
            status, payload, headers = routes.get(self.path, (200, png, {}))
            self.send_response(status)
            for k, v in headers.items():
                if k != "stream":
                    self.send_header(k, v)
            if "stream" not in headers:  # else: no length, the body runs until the close
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            try:
                self.wfile.write(payload)
            except OSError:
                pass

    server = ThreadingHTTPServer((HOST, port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{port}"
    server.shutdown()


@pytest.fixture(scope="module")
def remote(llava_server):
    settings = gateway_settings(
        llava_server.url,
        Path(llava_server.model),
        remote_image_hosts=[HOST, "127.0.0.1", "169.254.169.254"],
        remote_image_allow_http=True,
        remote_image_allowed_networks=[f"{HOST}/32"],  # test-only: the loopback image server
        remote_image_max_bytes=2_000_000,
        remote_image_timeout_s=1.5,
    )
    live = start_gateway(settings)
    yield live
    live.stop()


def image_body(url: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    return {"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": 2}


PART = "messages[0].content[0].image_url"


@pytest.mark.parametrize("path", ["/img.png", "/hop"])
def test_an_allowed_remote_image_is_fetched_by_the_gateway(remote, image_server, path):
    r = chat(remote.url, image_body(image_server + path), remote.api_key)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["visual_tokens"]["original"] == 576  # the gateway knew its size


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/to-loopback", 400, "resolves to a non-public address (127.0.0.1)"),
        ("/to-metadata", 400, "resolves to a non-public address (169.254.169.254)"),
        ("/loop", 400, "redirects"),
        ("/big", 413, "larger than the limit of 2000000 bytes"),
        ("/big-stream", 413, "larger than the limit of 2000000 bytes"),
        ("/slow", 504, "took longer than 1.5 s"),
        ("/text", 400, "not a decodable image"),
        ("/missing", 400, "answered HTTP 404"),
    ],
)
def test_unsafe_or_bad_remote_images_are_refused(remote, image_server, path, status, words):
    r = chat(remote.url, image_body(image_server + path), remote.api_key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == PART and words in error["message"], error
    assert (
        chat(remote.url, image_body(image_server + "/img.png"), remote.api_key).status_code == 200
    )


def test_hosts_and_schemes_outside_the_allow_list_are_refused(remote, image_server):
    r = chat(remote.url, image_body("http://example.com/cat.png"), remote.api_key)
    assert r.status_code == 400 and "not in this server's allowed hosts" in r.text
    settings = gateway_settings("http://127.0.0.1:9", None, remote_image_hosts=[HOST])
    live = start_gateway(settings)  # https only unless http is allowed
    try:
        r = chat(live.url, image_body(image_server + "/img.png"), live.api_key)
        assert r.status_code == 400 and "only https image URLs" in r.text
    finally:
        live.stop()


# --- failures mid-stream, slow clients ------------------------------------------------------
@pytest.fixture
def flaky_engine() -> Iterator[str]:
    """An 'engine' on loopback that streams two chunks and then drops the connection."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.recv(1 << 20)
            chunk = b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",' \
                    b'"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'  # fmt: skip
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + f"{len(chunk):x}\r\n".encode()
                + chunk
                + b"\r\n"
            )
            time.sleep(0.2)
            conn.close()  # mid-stream, without the terminating chunk

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    stop.set()
    thread.join(timeout=5)
    sock.close()


def metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.split("{")[0].split(" ")[0] == name and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_stream_that_breaks_ends_with_an_error_event(flaky_engine):
    live = start_gateway(gateway_settings(flaky_engine, None))
    try:
        with httpx.stream(
            "POST", f"{live.url}/v1/chat/completions", json=body(stream=True),
            headers={"Authorization": f"Bearer {live.api_key}"}, timeout=30,
        ) as r:  # fmt: skip
            events = [line for line in r.iter_lines() if line.startswith("data:")]
        assert '"content":"hi"' in events[0]
        assert '"error"' in events[-1] and "broke off" in events[-1] and '"code": 502' in events[-1]
        assert metric(live.url, "sparsevlm_requests_total", status="502") == 1
        assert metric(live.url, "sparsevlm_requests_total", status="499") == 0
        assert metric(live.url, "sparsevlm_upstream_errors_total", kind="protocol") == 1
    finally:
        live.stop()


def test_a_trickled_body_is_cut_with_408(llava_server):
    live = start_gateway(gateway_settings(llava_server.url, None, body_timeout_s=1.0))
    host, port = live.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100000\r\nAuthorization: Bearer " + live.api_key.encode()
                + b"\r\n\r\n{"
            )  # fmt: skip
            t0 = time.monotonic()
            for _ in range(8):  # a byte every half second: never the whole body in time
                time.sleep(0.5)
                try:
                    s.sendall(b" ")
                except OSError:
                    break
            reply = s.recv(65536).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408"), reply[:300]
        assert "did not arrive within 1 s" in reply and time.monotonic() - t0 < 6
        assert chat(live.url, body(), live.api_key).status_code == 200
    finally:
        live.stop()


def test_big_images_still_413_with_remote_fetching_on(remote):
    big = Image.new("RGB", (1100, 1000), "white")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = chat(remote.url, image_body(url), remote.api_key)
    assert r.status_code == 413 and "1100x1000" in r.text


def test_client_model_names_do_not_become_metric_labels(capped):
    r = chat(capped.url, {**body(), "model": "no-such-model-7"}, capped.api_key)
    assert r.status_code == 404
    text = httpx.get(f"{capped.url}/metrics").text
    assert "no-such-model-7" not in text and 'model="unknown",status="404"' in text
