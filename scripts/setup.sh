#!/usr/bin/env bash
# Create ./.venv with terrasynth, all its optional extras (the demo's data, Dask, LMDB) and
# the test tools (idempotent; re-runs when pyproject.toml or constraints.txt change).
# Sourced by demo.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
stamp="$venv/.terrasynth-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setting up $venv (first run takes a minute or two)" >&2
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # constraints.txt pins the CPU build of torch; without it pip may fetch a 5 GB CUDA build.
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[dev,all]" >&2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
# The map app's browser tests (tests/test_serve.py) drive Debian's Chromium through
# Playwright; no browser build is downloaded. test.sh asks for it (TERRASYNTH_BROWSER=1):
# installed with apt when missing and this shell may (root, apt-get present); otherwise
# those tests are skipped with the reason.
if [ "${TERRASYNTH_BROWSER:-0}" = 1 ] && [ ! -x /usr/bin/chromium ] \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (apt) for the map app's browser tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
    || echo "warning: chromium could not be installed; the browser tests will be skipped" >&2
fi
