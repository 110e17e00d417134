# The two commands of the README. Both install what they need on first run (idempotent).
.PHONY: serve test install lint

install:
	@bash scripts/install.sh

serve: install
	.venv/bin/sparsevlm serve $(ARGS)

test: install
	@bash scripts/test.sh $(ARGS)

lint: install
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
