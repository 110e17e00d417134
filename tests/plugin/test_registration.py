"""The plugin really loads in vLLM (vLLM swallows plugin errors, so prove it in a clean process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, logging
logging.basicConfig(level=logging.INFO)  # a bare process: vLLM has not configured logging
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm import ModelRegistry
entry = ModelRegistry.models["LlavaForConditionalGeneration"]
print(json.dumps([getattr(entry, "module_name", None), getattr(entry, "class_name", None)]))
"""


def _probe(env_extra: dict[str, str]) -> tuple[list, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"} | env_extra
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_registry_maps_llava_to_sparse_class_and_logs_once():
    (module, cls), log = _probe({})
    assert (module, cls) == ("sparse_plugin.models.llava", "SparseLlavaForConditionalGeneration")
    assert log.count("SparseVLM plugin loaded") == 1, log[-2000:]


def test_without_plugins_vllm_keeps_its_own_class():
    (module, cls), log = _probe({"VLLM_PLUGINS": ""})
    assert module == "vllm.model_executor.models.llava"
    assert cls == "LlavaForConditionalGeneration"
    assert "SparseVLM plugin loaded" not in log


@pytest.mark.engine
def test_engine_processes_log_the_plugin(llava_server):
    log = llava_server.log_text()
    assert "SparseVLM plugin loaded" in log
    # API server and engine core both build/process models: both must have loaded the plugin.
    assert len({line.split(")")[0] for line in log.splitlines() if "SparseVLM plugin" in line}) >= 2
