#!/usr/bin/env bash
# On a machine with CUDA: run the CUDA tests, then suites/gpu.yaml (eager) and
# suites/gpu_cuda_graph.yaml (CUDA-graph replay), and write everything under
# results/gpu_check/<UTC time>/ (test log and JUnit XML, the two runs, a summary).
# Budget: under 8 minutes (tests <= 2 min, each suite <= 2.5 min; a suite cut short by its
# limit keeps its rows and can be finished with `moebench run SUITE --resume RUN_DIR`).
#   bash scripts/gpu_check.sh           full suites
#   bash scripts/gpu_check.sh --quick   the suites' --quick sizes (about a minute in all)
# Without CUDA it runs nothing and exits 3 with one line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/setup.sh)

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: CUDA is not available on this machine (torch $("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not importable')); nothing was run" >&2
  exit 3
fi

quick=()
case "${1:-}" in
  --quick) quick=(--quick) ;;
  "") ;;
  *) echo "gpu_check: unknown option $1 (expected --quick or nothing)" >&2; exit 2 ;;
esac

out="results/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
"$py" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')" \
  | tee "$out/device.txt"

status=0
echo "== CUDA tests (pytest -m cuda)"
timeout 120 "$py" -m pytest -q -p no:cacheprovider -m cuda --junitxml "$out/cuda_tests.xml" tests \
  2>&1 | tee "$out/cuda_tests.log" || status=1

for suite in gpu gpu_cuda_graph; do
  echo "== suites/$suite.yaml ${quick[*]:-}"
  timeout 150 "$py" -m moebench run "suites/$suite.yaml" "${quick[@]}" --results "$out/results" \
    --reports "$out/reports" 2>&1 | tee "$out/$suite.log" || status=1
done

# one line per suite: rows by status, and phases by status (skipped phases: not capturable)
"$py" - "$out/results" <<'PY' | tee "$out/summary.txt"
import collections, json, pathlib, sys
for rows_file in sorted(pathlib.Path(sys.argv[1]).glob("*/*/rows.jsonl")):
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    by_row = collections.Counter(r["status"] for r in rows)
    by_phase = collections.Counter(f"{p}:{r.get(f'{p}.status')}" for r in rows if r["status"] == "ok"
                                   for p in ("route", "dispatch", "combine"))
    print(f"{rows_file.parent.parent.name}: rows {dict(by_row)}; phases {dict(sorted(by_phase.items()))}")
PY
echo "gpu_check: results in $out (exit $status)"
exit $status
