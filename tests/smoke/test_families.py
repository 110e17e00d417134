"""Smoke tests: each fixture family loads in real vLLM and counts image tokens as its model implies.

The expected counts are computed here from each model's published geometry, independently of
the processors under test, and pinned by a table of hand-checked values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import image_data_url
from tests.vllm_server import VllmServer

Size = tuple[int, int]  # (width, height)

# Square, 4:3, tall 1:3, wide ~4:1, tiny (Qwen upscales to min_pixels), 20:1 strip.
# No size is a float tie of the Qwen resize (e.g. 1000 x 250: 250 / beta is exactly 8 x 28).
EXPECTED: dict[Size, dict[str, int]] = {
    (336, 336): {"llava-1.5": 576, "llava-next": 1176, "qwen2.5-vl": 144, "qwen3-vl": 100},
    (800, 600): {"llava-1.5": 576, "llava-next": 2340, "qwen2.5-vl": 234, "qwen3-vl": 234},
    (300, 900): {"llava-1.5": 576, "llava-next": 2376, "qwen2.5-vl": 243, "qwen3-vl": 252},
    (1000, 260): {"llava-1.5": 576, "llava-next": 1890, "qwen2.5-vl": 248, "qwen3-vl": 248},
    (40, 30): {"llava-1.5": 576, "llava-next": 1368, "qwen2.5-vl": 6, "qwen3-vl": 6},
    (2000, 100): {"llava-1.5": 576, "llava-next": 868, "qwen2.5-vl": 213, "qwen3-vl": 186},
}
SIZES = list(EXPECTED)


def llava15_tokens(width: int, height: int) -> int:
    """LLaVA-1.5: every image is resized/cropped to 336 px -> a 24 x 24 grid of 14-px patches."""
    return (336 // 14) ** 2


def best_pinpoint(width: int, height: int, pinpoints: list[Size]) -> Size:
    """LLaVA-NeXT's canvas choice: most image pixels kept after fitting, then least padding."""
    best, best_kept, best_waste = pinpoints[0], -1, math.inf
    for ph, pw in pinpoints:  # (height, width), as in config.image_grid_pinpoints
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ph, pw), kept, waste
    return best


def llava_next_tokens(width: int, height: int) -> int:
    """LLaVA-NeXT anyres: 576 base-view tokens + the tile features with the letterbox padding
    removed + one image_newline per remaining feature row."""
    pinpoints = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    ph, pw = best_pinpoint(width, height, pinpoints)
    rows, cols = ph // 336 * 24, pw // 336 * 24  # 24 x 24 features per 336-px tile
    if width / height > cols / rows:  # wider than the canvas: padding rows top and bottom
        kept = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept) // 2)
    else:  # padding columns left and right
        kept = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept) // 2)
    return 576 + rows * cols + rows


def qwen_resized(
    width: int, height: int, factor: int = 28, lo: int = 56 * 56, hi: int = 28 * 28 * 256
) -> Size:
    """Qwen-VL resize: sides to multiples of ``factor`` (patch x 2 merge), area within
    [lo, hi] (the fixture processor's min/max pixels), aspect kept. Defaults: Qwen2.5-VL's
    14-px patches and the fixture's 56*56 .. 28*28*256."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > hi:
        beta = math.sqrt(height * width / hi)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < lo:
        beta = math.sqrt(lo / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def qwen_tokens(width: int, height: int) -> int:
    """One token per 2 x 2 block of 14-px patches of the resized image (one temporal patch)."""
    w, h = qwen_resized(width, height)
    return (h // 14) * (w // 14) // 4


def qwen3_tokens(width: int, height: int) -> int:
    """Qwen3-VL: 16-px patches, so one token per 32 x 32 px of the resized image; the fixture's
    processor keeps 4 .. 256 tokens (32*32*4 .. 32*32*256 pixels)."""
    w, h = qwen_resized(width, height, factor=32, lo=32 * 32 * 4, hi=32 * 32 * 256)
    return (h // 32) * (w // 32)


FORMULAS: dict[str, Callable[[int, int], int]] = {
    "llava-1.5": llava15_tokens,
    "llava-next": llava_next_tokens,
    "qwen2.5-vl": qwen_tokens,
    "qwen3-vl": qwen3_tokens,
}
SERVERS = {
    "llava-1.5": "llava_server",
    "llava-next": "llava_next_server",
    "qwen2.5-vl": "qwen_server",
    "qwen3-vl": "qwen3_server",
}
# Template tokens around each image besides its placeholders: "\n" after <image> for LLaVA;
# <|vision_start|> and <|vision_end|> for Qwen.
TEMPLATE_TOKENS_PER_IMAGE = {"llava-1.5": 1, "llava-next": 1, "qwen2.5-vl": 2, "qwen3-vl": 2}


@pytest.mark.parametrize("family", list(FORMULAS))
def test_formulas_reproduce_the_hand_checked_table(family: str):
    assert {s: FORMULAS[family](*s) for s in SIZES} == {s: EXPECTED[s][family] for s in SIZES}


def test_qwen_resize_keeps_sides_multiples_of_28_within_the_pixel_bounds():
    for w, h in [*SIZES, (28, 28), (5000, 60), (448, 448)]:
        rw, rh = qwen_resized(w, h)
        assert rw % 28 == 0 and rh % 28 == 0, (w, h)
        assert 56 * 56 <= rw * rh <= 28 * 28 * 256, (w, h, rw, rh)


def chat(server: VllmServer, sizes: list[Size]) -> dict[str, Any]:
    """One user turn with an image per size (distinct colours), then a question."""
    images = [Image.new("RGB", s, (40 * i, 120, 200)) for i, s in enumerate(sizes)]
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images
    ]
    content.append({"type": "text", "text": "Describe the image in detail."})
    body = {
        "model": Path(server.model).name,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "temperature": 0,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def image_tokens(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["multimodal_tokens"]["image"])


@pytest.mark.engine
@pytest.mark.parametrize("family", list(FORMULAS))
def test_one_image_generates_with_the_models_token_count(family: str, request):
    server: VllmServer = request.getfixturevalue(SERVERS[family])
    text_tokens = set()
    for size in SIZES:
        out = chat(server, [size])
        assert image_tokens(out) == EXPECTED[size][family], size
        assert out["usage"]["completion_tokens"] >= 1
        assert out["choices"][0]["message"]["content"] is not None
        text_tokens.add(out["usage"]["prompt_tokens"] - image_tokens(out))
    assert len(text_tokens) == 1  # the rest of the prompt does not depend on the image size


@pytest.mark.engine
@pytest.mark.parametrize("family", list(FORMULAS))
def test_two_images_generate_with_the_sum_of_their_token_counts(family: str, request):
    server: VllmServer = request.getfixturevalue(SERVERS[family])
    first, second = SIZES[1], SIZES[2]
    one = chat(server, [first])
    two = chat(server, [first, second])
    assert image_tokens(two) == EXPECTED[first][family] + EXPECTED[second][family]
    added = two["usage"]["prompt_tokens"] - one["usage"]["prompt_tokens"]
    assert added == EXPECTED[second][family] + TEMPLATE_TOKENS_PER_IMAGE[family]
    assert two["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("family", ["llava-next", "qwen2.5-vl", "qwen3-vl"])
def test_fixture_build_is_deterministic(family: str, tmp_path: Path, fixture_models):
    from sparse_plugin.fixtures import make_fixtures

    again = make_fixtures(tmp_path, [family])[family]
    original = fixture_models[family]
    names = sorted(p.name for p in original.iterdir())
    assert sorted(p.name for p in again.iterdir()) == names
    for name in names:
        assert (again / name).read_bytes() == (original / name).read_bytes(), name
