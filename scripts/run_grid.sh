#!/usr/bin/env bash
# Run a grid to its end across interruptions, committing its small outputs as they appear.
#
#   scripts/run_grid.sh configs/smollm2_grid_resolved.yaml [--only ...]
#
# `seqcpo reproduce` skips every stage whose done.json fingerprint matches, so running this again (after a kill,
# a reboot, or on a fresh clone that has the committed outputs) continues with the first missing stage. Every
# 5 minutes and at the end the grid's out_dir is committed (the .gitignore keeps weights, optimizer states and
# negatives' shards out), so a new machine starting from the repository loses at most one stage in progress.
# Runs under `nice`; the log goes to OUT_DIR/grid.log (not committed).
#
# Torch runs GRID_THREADS threads (default 1): a matrix product's float sums can depend on the thread count, so a
# fixed count keeps a retrained arm bit-identical to the committed outputs whatever machine continues the grid,
# and one thread is not starved by other work on a 2-core machine (two threads sharing their cores with a third
# busy process spin in OpenMP barriers: a step took 2-10x longer, measured 2026-12-02).
set -uo pipefail
cd "$(dirname "$0")/.."
grid=${1:?usage: scripts/run_grid.sh GRID.yaml [seqcpo reproduce options]}
shift
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${GRID_THREADS:-1} MKL_NUM_THREADS=${GRID_THREADS:-1}
out=$("$py" -c 'import sys; from seqcpo.grid import load_grid; print(load_grid(sys.argv[1]).out_dir)' "$grid") || exit 2
mkdir -p "$out"

# Two workers on one tree (`--only` other arms) commit in turn: flock on a file in .git serializes them, so
# neither loses a commit to the other's index.lock.
# Without flock (macOS) it commits unguarded; a commit skipped is said in the log.
commit() {
  (
    if command -v flock >/dev/null && ! flock -w 120 9; then
      echo "$(date -u +%H:%M) commit skipped: another worker held the commit lock for 120 s" >> "$out/grid.log"
      exit 0
    fi
    git add -- "$out" >/dev/null 2>&1 9>&-
    if ! git diff --cached --quiet -- "$out" 9>&-; then
      git commit -q -m "grid $(basename "$grid" .yaml): outputs as of $(date -u +%Y-%m-%dT%H:%MZ)" -- "$out" 9>&- \
        && echo "$(date -u +%H:%M) committed $out" >> "$out/grid.log"
    fi
  ) 9>"$(git rev-parse --git-dir)/seqcpo-grid-commit.lock"
}

( while sleep 300; do commit; done ) &
watcher=$!
trap 'kill $watcher 2>/dev/null; commit' EXIT
nice -n 10 "$py" -m seqcpo.cli reproduce "$grid" "$@" >> "$out/grid.log" 2>&1
