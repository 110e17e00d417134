#!/usr/bin/env bash
# The test command: lint, then the whole suite (unit + real vLLM engines on CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install.sh
if [[ -f scripts/ci-system-deps.sh ]]; then bash scripts/ci-system-deps.sh; fi
export SPARSEVLM_TEST_LOGS="${SPARSEVLM_TEST_LOGS:-$root/.cache/test-logs}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -ra "$@"
