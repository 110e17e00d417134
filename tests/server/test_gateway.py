"""The gateway over HTTP against the real vLLM engine, with the official openai client (issue 6)."""

from __future__ import annotations

import asyncio
import base64
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import image_data_url
from tests.gateway_fixtures import API_KEY, gateway_settings, start_gateway
from tests.plugin.conftest import shapes_image

pytestmark = pytest.mark.engine
MODEL = "llava-1.5"


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)


def messages(n_images: int, question: str = "What color is the circle?") -> list[dict]:
    parts = [
        {"type": "image_url", "image_url": {"url": image_data_url(shapes_image(i))}}
        for i in range(n_images)
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def ask(client, n_images=1, sparsity=None, **kw):
    extra = {"sparsity": sparsity} if sparsity is not None else None
    return client.chat.completions.create(
        model=MODEL,
        messages=messages(n_images),
        max_tokens=4,
        temperature=0,
        extra_body=extra,
        **kw,
    )


def post(gateway, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    h = {"Authorization": f"Bearer {API_KEY}"} | (headers or {})
    if isinstance(body, bytes):
        h = h | {"Content-Type": "application/json"}
        return httpx.post(f"{gateway.url}/v1/chat/completions", content=body, headers=h)
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=h, timeout=120)


def metric(gateway, name: str, **labels: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            if line.split("{")[0].split(" ")[0] == name:
                total += float(line.rsplit(" ", 1)[1])
    return total


# --- API ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_images", [1, 2])
def test_non_stream_usage_is_truthful(client, n_images):
    full = ask(client, n_images)
    pruned = ask(client, n_images, {"visual_tokens": 64})
    assert full.usage.model_extra["visual_tokens"] == {
        "original": 576 * n_images,
        "kept": 576 * n_images,
        "saved": 0,
    }
    visual = pruned.usage.model_extra["visual_tokens"]
    assert visual == {"original": 576 * n_images, "kept": 64 * n_images, "saved": 512 * n_images}
    assert full.usage.prompt_tokens - pruned.usage.prompt_tokens == visual["saved"]
    assert pruned.choices[0].message.content is not None


@pytest.mark.parametrize("n_images", [1, 2])
def test_stream_with_usage_chunk(client, n_images):
    stream = ask(
        client, n_images, {"keep_ratio": 0.25}, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.model_extra["visual_tokens"]["kept"] == 144 * n_images
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask(client, n_images, {"keep_ratio": 0.25}).choices[0].message.content


def test_stream_without_include_usage_has_no_usage_chunk_and_ends_done(gateway):
    body = {"model": MODEL, "messages": messages(1), "max_tokens": 3, "stream": True}
    h = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=h) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert all('"usage"' not in e or '"usage":null' in e for e in events[:-1])


def test_models_health_and_openapi(gateway, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{gateway.url}/health").json() == {"status": "ok", "upstream": "ready"}
    schema = httpx.get(f"{gateway.url}/openapi.json").json()
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "sparsity" in props
    assert "VisualTokenUsage" in schema["components"]["schemas"]


def test_default_sparsity_applies_when_absent(llava_server):
    live = start_gateway(
        gateway_settings(
            llava_server.url, None, default_sparsity={"visual_tokens": 32}, api_keys=[]
        )
    )
    try:
        r = httpx.post(
            f"{live.url}/v1/chat/completions",
            json={"model": MODEL, "messages": messages(1), "max_tokens": 2},
            timeout=120,
        )
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens_details"]["multimodal_tokens"]["image"] == 32
        assert "visual_tokens" not in r.json()["usage"]  # no model_dir: original unknown
    finally:
        live.stop()


# --- errors ---------------------------------------------------------------------------------
def _img_url(img: Image.Image) -> str:
    return image_data_url(img)


@pytest.mark.parametrize(
    ("mutate", "status", "words"),
    [
        (lambda b: b | {"mm_processor_kwargs": {"x": 1}}, 400, "mm_processor_kwargs"),
        (lambda b: b | {"sparsity": {"visual_tokens": 0}}, 400, "sparsity.visual_tokens"),
        (lambda b: b | {"sparsity": {"visual_tokens": 8, "keep_ratio": 0.5}}, 400, "not both"),
        (lambda b: b | {"sparsity": {"method": "nope", "visual_tokens": 8}}, 400, "method"),
        (lambda b: b | {"messages": []}, 400, "messages"),
        (lambda b: {k: v for k, v in b.items() if k != "model"}, 400, "model"),
    ],
)
def test_request_errors(gateway, mutate, status, words):
    r = post(gateway, mutate({"model": MODEL, "messages": messages(1), "max_tokens": 2}))
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def _with_image_url(url: str) -> dict:
    return {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
    }


def test_image_errors_name_the_part(gateway):
    r = post(gateway, _with_image_url("data:image/png;base64,@@@not-base64@@@"))
    assert (
        r.status_code == 400 and "messages[0].content[0].image_url" in r.json()["error"]["message"]
    )
    assert "base64" in r.json()["error"]["message"]
    junk = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    r = post(gateway, _with_image_url(junk))
    assert r.status_code == 400 and "not a decodable image" in r.json()["error"]["message"]
    r = post(gateway, _with_image_url("https://example.com/cat.png"))
    assert r.status_code == 400 and "remote image URLs are disabled" in r.json()["error"]["message"]
    big = _img_url(Image.new("RGB", (1100, 1000), "white"))
    r = post(gateway, _with_image_url(big))
    assert r.status_code == 413 and "1100x1000" in r.json()["error"]["message"]
    r = post(gateway, {"model": MODEL, "messages": messages(4), "max_tokens": 2})
    assert r.status_code == 400 and "4 images" in r.json()["error"]["message"]


def test_malformed_json_auth_and_body_limit(gateway):
    r = post(gateway, b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = post(gateway, {"model": MODEL, "messages": messages(1)}, {"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = post(gateway, b"x" * (5 * 1024 * 1024))
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]
    assert httpx.get(f"{gateway.url}/health").status_code == 200  # open
    assert httpx.get(f"{gateway.url}/metrics").status_code == 200  # open by default


def test_request_id_propagated_or_generated(gateway):
    body = {"model": MODEL, "messages": messages(1), "max_tokens": 2}
    assert post(gateway, body, {"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(post(gateway, body).headers["x-request-id"]) == 32


def test_upstream_down_is_503_fast():
    from tests.vllm_server import free_port

    live = start_gateway(gateway_settings(f"http://127.0.0.1:{free_port()}", None))
    try:
        t = time.perf_counter()
        r = post(live, {"model": MODEL, "messages": messages(1), "max_tokens": 2})
        assert r.status_code == 503 and time.perf_counter() - t < 1.0
        assert httpx.get(f"{live.url}/health").status_code == 503
    finally:
        live.stop()


def test_upstream_timeout_is_504(llava_server):
    live = start_gateway(gateway_settings(llava_server.url, None, request_timeout_s=0.05))
    try:
        body = {"model": MODEL, "messages": messages(1), "max_tokens": 400, "ignore_eos": True}
        r = post(live, body)
        assert r.status_code == 504 and "did not answer in time" in r.json()["error"]["message"]
    finally:
        live.stop()


# Keeps the tiny engine busy for several seconds: 2 samples x 1500 tokens, EOS ignored.
LONG = {"max_tokens": 1500, "ignore_eos": True, "n": 2, "temperature": 1.0}


def test_concurrency_cap_is_429_with_retry_after(llava_server):
    live = start_gateway(gateway_settings(llava_server.url, None, max_concurrency=1))
    body = {"model": MODEL, "messages": messages(1), "max_tokens": 2}
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, live, body | LONG)
            deadline = time.monotonic() + 10
            while metric(live, "sparsevlm_requests_in_flight") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            second = post(live, body)
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            assert "too many requests" in second.json()["error"]["message"]
            assert first.result().status_code == 200
        assert post(live, body).status_code == 200  # the slot is free again
    finally:
        live.stop()


def test_client_disconnect_frees_the_engine(gateway, llava_server):
    body = {"model": MODEL, "messages": messages(1), "stream": True} | LONG
    h = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=h) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert _running(llava_server) >= 1
    deadline = time.monotonic() + 10
    while _running(llava_server) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(llava_server) == 0
    # The gateway records the outcome once it has closed the upstream stream: no GC in between.
    assert metric(gateway, "sparsevlm_requests_total", model=MODEL, status="499") >= 1


def _running(server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:num_requests_running not exported")


# --- metrics and load -----------------------------------------------------------------------
def test_metrics_after_scripted_run(gateway, client):
    names = ["original", "kept", "saved"]
    before = {n: metric(gateway, f"sparsevlm_visual_tokens_{n}_total", model=MODEL) for n in names}
    ok_before = metric(gateway, "sparsevlm_requests_total", model=MODEL, status="200")
    ask(client, 1, {"visual_tokens": 64})
    ask(client, 2, {"visual_tokens": 100, "method": "random"})
    ask(client, 1)
    with pytest.raises(openai.BadRequestError):
        ask(client, 1, {"visual_tokens": -3})
    after = {n: metric(gateway, f"sparsevlm_visual_tokens_{n}_total", model=MODEL) for n in names}
    assert after["original"] - before["original"] == 576 * 4
    assert after["kept"] - before["kept"] == 64 + 200 + 576
    assert after["saved"] - before["saved"] == 512 + 952
    assert metric(gateway, "sparsevlm_requests_total", model=MODEL, status="200") - ok_before == 3
    assert metric(gateway, "sparsevlm_prefill_flops_saved_total", model=MODEL) > 0
    assert metric(gateway, "sparsevlm_requests_in_flight") == 0
    assert metric(gateway, "sparsevlm_time_to_first_token_seconds_count", model=MODEL) >= 3


def test_32_concurrent_mixed_requests_equal_solo(gateway):
    knobs = [None, {"visual_tokens": 64}, {"keep_ratio": 0.5, "method": "uniform"},
             {"visual_tokens": 48, "version": "v2"}]  # fmt: skip
    bodies = [
        {
            "model": MODEL,
            "messages": messages(
                1 + i % 2, ["What color is the circle?", "How many squares?"][i % 3 % 2]
            ),
            "max_tokens": 4,
            "temperature": 0,
            **({"sparsity": knobs[i % 4]} if knobs[i % 4] else {}),
        }
        for i in range(32)
    ]
    h = {"Authorization": f"Bearer {API_KEY}"}

    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=300) as c:
            rs = await asyncio.gather(
                *(c.post(f"{gateway.url}/v1/chat/completions", json=b, headers=h) for b in bodies)
            )
        return [r.json() for r in rs]

    together = asyncio.run(run())
    for body, got in zip(bodies, together, strict=True):
        solo = post(gateway, body).json()
        assert got["choices"][0]["message"]["content"] == solo["choices"][0]["message"]["content"]
        assert got["usage"]["prompt_tokens"] == solo["usage"]["prompt_tokens"]
