"""Smoke tests: each fixture family loads in real vLLM and counts image tokens as its model implies.

The expected counts are computed here from each model's published geometry, independently of
the processors under test.
"""

from __future__ import annotations

import math

import httpx
import pytest
from PIL import Image

from tests.conftest import image_data_url

pytestmark = pytest.mark.engine

SIZES = [(336, 336), (800, 600), (300, 900), (1024, 256)]


def llava15_tokens(width: int, height: int) -> int:
    return (336 // 14) ** 2


def llava_next_tokens(width: int, height: int) -> int:
    """LLaVA-NeXT anyres: base view + unpadded tiles + one newline per feature row."""
    pinpoints = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (h, w)
    best, best_eff, best_waste = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        dw, dh = int(width * scale), int(height * scale)
        eff = min(dw * dh, width * height)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    ph, pw = best
    rows, cols = ph // 336 * 24, pw // 336 * 24  # feature grid of the tiles
    if width / height > cols / rows:
        new_h = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_h) // 2)
    else:
        new_w = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_w) // 2)
    return rows * cols + rows + 576


def qwen_tokens(width: int, height: int) -> int:
    """Qwen2.5-VL: resize to multiples of 28 within [min, max] pixels, 14-px patches, 2x2 merge."""
    factor, lo, hi = 28, 56 * 56, 28 * 28 * 256
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > hi:
        beta = math.sqrt(height * width / hi)
        h, w = (
            math.floor(height / beta / factor) * factor,
            math.floor(width / beta / factor) * factor,
        )
    elif h * w < lo:
        beta = math.sqrt(lo / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // 14) * (w // 14) // 4


FAMILIES = {
    "llava-1.5": ("llava_server", llava15_tokens),
    "llava-next": ("llava_next_server", llava_next_tokens),
    "qwen2.5-vl": ("qwen_server", qwen_tokens),
}


def _chat(server, sizes: list[tuple[int, int]]) -> dict:
    images = [Image.new("RGB", s, (40 * i, 120, 200)) for i, s in enumerate(sizes)]
    content = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
    content.append({"type": "text", "text": "Describe the image in detail."})
    body = {
        "model": server.model.rsplit("/", 1)[-1],
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "temperature": 0,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_and_two_images_generate_with_the_models_token_counts(family, request):
    fixture, expected = FAMILIES[family]
    server = request.getfixturevalue(fixture)
    text_tokens = set()
    for sizes in ([s] for s in SIZES):
        out = _chat(server, sizes)
        usage = out["usage"]
        image = usage["prompt_tokens_details"]["multimodal_tokens"]["image"]
        assert image == sum(expected(*s) for s in sizes), (family, sizes)
        assert out["usage"]["completion_tokens"] >= 1
        text_tokens.add(usage["prompt_tokens"] - image)
    assert len(text_tokens) == 1  # the text part does not depend on the image size
    two = _chat(server, SIZES[:2])
    image = two["usage"]["prompt_tokens_details"]["multimodal_tokens"]["image"]
    assert image == expected(*SIZES[0]) + expected(*SIZES[1])
    assert two["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("family", ["llava-next", "qwen2.5-vl"])
def test_fixture_build_is_deterministic(family, tmp_path, fixture_models):
    from sparse_plugin.fixtures import make_fixtures

    again = make_fixtures(tmp_path, [family])[family]
    original = fixture_models[family]
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (original / name).read_bytes(), name
