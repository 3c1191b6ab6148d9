# The two commands of the README do all their own set-up: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test system-packages lint typecheck unit bench schema clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/conveyor demo

lint: $(STAMP)
	$(BIN)/ruff format --check conveyor tests benchmarks
	$(BIN)/ruff check conveyor tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite drives Chromium, PgBouncer and Prometheus for real; no test skips for a missing tool.
system-packages:
	@scripts/system-packages.sh

test: system-packages lint typecheck
	$(BIN)/pytest -q --timeout=300

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# conveyor beside pgqueuer and graphile-worker on one server; the peers are installed on first use
# under build/peers (a venv of their own, an npm prefix), never into $(VENV).
.PHONY: bench-peers
bench-peers: $(STAMP)
	$(BIN)/python -m benchmarks.peers

schema: $(STAMP)
	$(BIN)/python -m tests.integration.test_schema

clean:
	rm -rf $(VENV) build dist *.egg-info
