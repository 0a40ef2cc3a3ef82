#!/usr/bin/env bash
# Set up, run the default suite, and print where its results and report are.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup.sh)
exec "$py" -m moebench run suites/quickstart.yaml "$@"
