#!/usr/bin/env bash
# Set up (if needed) and run the main job on the built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
terrasynth demo --overwrite "$@"  # replaces only an earlier demo (its marker)
