"""The gateway's unpruned image-token count equals each family's independent formula."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.accounting import ModelGeometry, visual_usage_by_modality
from tests.smoke.test_families import FORMULAS, SIZES


@pytest.mark.parametrize("family", list(FORMULAS))
def test_original_count_matches_the_family_formula(fixture_models: dict[str, Path], family):
    geometry = ModelGeometry.from_dir(fixture_models[family])
    for size in SIZES:
        assert geometry.original_tokens([size]) == FORMULAS[family](*size), size
    assert geometry.original_tokens(SIZES) == sum(FORMULAS[family](*s) for s in SIZES)


def test_unknown_size_means_no_visual_usage(fixture_models: dict[str, Path]):
    qwen = ModelGeometry.from_dir(fixture_models["qwen2.5-vl"])
    usage = {"prompt_tokens": 90, "prompt_tokens_details": {"multimodal_tokens": {"image": 64}}}
    image = {"original": 144, "kept": 64, "saved": 80}
    assert visual_usage_by_modality(qwen, [(336, 336)], usage) == {"image": image}
    # a remote URL: size unknown
    assert visual_usage_by_modality(qwen, [(336, 336), None], usage) is None
    llava = ModelGeometry.from_dir(fixture_models["llava-1.5"])
    fixed = visual_usage_by_modality(llava, [None, (10, 10)], usage)
    assert fixed is not None and fixed["image"]["original"] == 1152  # fixed count


@pytest.mark.engine
@pytest.mark.parametrize("server_fixture", ["llava_next_server", "qwen_server", "qwen3_server"])
def test_gateway_usage_for_size_dependent_families(request, server_fixture):
    """Through the gateway: original from the processor, saved == the measured prompt drop."""
    import httpx

    from tests.conftest import image_data_url
    from tests.gateway_fixtures import gateway_settings, start_gateway
    from tests.plugin.conftest import shapes_image

    engine = request.getfixturevalue(server_fixture)
    family = {
        "llava_next_server": "llava-next",
        "qwen_server": "qwen2.5-vl",
        "qwen3_server": "qwen3-vl",
    }[server_fixture]
    gw = start_gateway(gateway_settings(engine.url, Path(engine.model)))
    try:
        sizes = [(800, 600), (300, 900)]
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(shapes_image(i).resize(s))}}
            for i, s in enumerate(sizes)
        ] + [{"type": "text", "text": "What color is the circle?"}]

        def usage(sparsity):
            body = {"model": Path(engine.model).name, "max_tokens": 2,
                    "messages": [{"role": "user", "content": content}]}  # fmt: skip
            if sparsity:
                body["sparsity"] = sparsity
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=300,
                           headers={"Authorization": f"Bearer {gw.api_key}"})  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()["usage"]

        full, pruned = usage(None), usage({"visual_tokens": 40})
        original = sum(FORMULAS[family](*s) for s in sizes)
        assert full["visual_tokens"] == {"original": original, "kept": original, "saved": 0}
        assert pruned["visual_tokens"] == {"original": original, "kept": 80, "saved": original - 80}
        assert full["prompt_tokens"] - pruned["prompt_tokens"] == original - 80
    finally:
        gw.stop()
