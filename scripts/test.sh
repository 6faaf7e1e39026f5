#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
TERRASYNTH_BROWSER=1 source scripts/setup.sh
ruff check src tests bench
ruff format --check src tests bench
python -m pytest -q "$@"
