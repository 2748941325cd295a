#!/usr/bin/env bash
# Runs the whole test suite: lint, types, then every test (integration included).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
mypy
python -m protocol.proto.generate --check
pytest "$@"
