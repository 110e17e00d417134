"""The console script: `sparsevlm make-fixtures` and `sparsevlm serve --help`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "sparse_plugin.cli"]


def test_make_fixtures_writes_a_loadable_llava_checkpoint(tmp_path: Path):
    out = subprocess.run(
        [*CLI, "make-fixtures", str(tmp_path), "--family", "llava-1.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"llava-1.5: {tmp_path / 'llava-1.5'}"
    config = json.loads((tmp_path / "llava-1.5" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["image_size"] // config["vision_config"]["patch_size"] == 24
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (tmp_path / "llava-1.5" / name).exists(), name


def test_unknown_family_is_a_clear_error(tmp_path: Path):
    out = subprocess.run(
        [*CLI, "make-fixtures", str(tmp_path), "--family", "gpt-9"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "gpt-9" in out.stderr


def test_serve_help_lists_the_model_and_gpu_flags():
    out = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--model" in out.stdout and "--gpu" in out.stdout


def test_serve_rejects_a_bad_vision_cache_size_before_starting_anything():
    out = subprocess.run(
        [*CLI, "serve", "--vision-cache-mb", "lots"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "--vision-cache-mb" in out.stderr and "lots" in out.stderr
    assert "Traceback" not in out.stderr
