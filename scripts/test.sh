#!/usr/bin/env bash
# Set up and run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup.sh)
exec "$py" -m pytest "$@"
