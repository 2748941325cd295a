#!/usr/bin/env bash
# Runs containers through pyshim (see scripts/demo.py); needs scripts/install.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/demo.py
