"""``python -m server``: the gateway alone, settings from ``SPARSEVLM_GATEWAY_*`` (what the
container runs). A bad setting is one clear message and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys

from server.config import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"sparsevlm gateway: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    import uvicorn

    from server.main import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
