#!/usr/bin/env bash
# The test suite on a GPU machine with one backend forced, in parts that fit a time limit:
#   scripts/gpu_suite.sh BACKEND [FIRST [COUNT]]
# runs COUNT test files (all by default) from the FIRST (0-based, in name order) with
# FLASH_ATTN_JAX_BACKEND=BACKEND ("auto": the automatic choice), 16 xdist workers (WORKERS),
# verbose, so that a run stopped by a time limit (SUITE_TIMEOUT seconds, 540 by default) still
# names every test that finished and how. The log goes to $OUT (or .) as
# suite_BACKEND_FIRST.log; its last lines are printed, failures first.
# Runs the Python on PATH (the GPU machine's environment; PYTHON overrides it).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/gpu_suite.sh BACKEND [FIRST [COUNT]]" >&2; exit 2; }
backend=$1; first=${2:-0}
mapfile -t files < <(ls tests/test_*.py)
count=${3:-${#files[@]}}
selected=("${files[@]:first:count}")
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ "$backend" != auto ]; then export FLASH_ATTN_JAX_BACKEND=$backend; fi
log=${OUT:-.}/suite_${backend}_${first}.log
echo "backend=$backend files=${selected[*]}" > "$log"
timeout "${SUITE_TIMEOUT:-540}" "${PYTHON:-python}" -m pytest -v -n "${WORKERS:-16}" -p no:benchmark \
  "${selected[@]}" >> "$log" 2>&1
echo "exit status $? (124: stopped by the time limit)" >> "$log"
grep -E "^(FAILED|ERROR)|\] (FAILED|ERROR) " "$log" | head -40
printf '%s tests passed, %s skipped, %s failed before the end\n' \
  "$(grep -c ' PASSED ' "$log")" "$(grep -c ' SKIPPED ' "$log")" "$(grep -cE ' (FAILED|ERROR) ' "$log")"
tail -5 "$log"
