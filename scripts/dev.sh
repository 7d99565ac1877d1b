#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv with Python >= 3.12, installs flash_attn_jax
# with its test extras (JAX pinned by constraints.txt), then runs one job:
#   scripts/dev.sh demo    the demo: forward (and backward when available) on random data,
#                          checked against the reference, with the backend and timings
#   scripts/dev.sh test    the whole test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: scripts/dev.sh demo|test [pytest arguments...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
job=$1; shift
case "$job" in demo|test) ;; *) usage ;; esac

supports_312() { "$@" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local candidate version root
  for candidate in python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && supports_312 "$candidate"; then
      command -v "$candidate"; return 0
    fi
  done
  # pyenv shims fail unless a version is selected; ask pyenv for its interpreters directly.
  root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  for version in $(ls "$root/versions" 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.|$)' | sort -V); do
    candidate="$root/versions/$version/bin/python3"
    if [ -x "$candidate" ] && supports_312 "$candidate"; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! supports_312 .venv/bin/python; then
  if ! python=$(find_python); then
    echo "error: flash_attn_jax needs Python >= 3.12 (JAX 0.11 does not support older ones)." >&2
    echo "Tried python3.12, python3.13 and python3 on PATH, and pyenv's versions 3.12+ under" >&2
    echo "$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")/versions. Install one (e.g. 'pyenv install 3.12')." >&2
    exit 1
  fi
  echo "creating .venv with $python ($("$python" --version 2>&1))"
  rm -rf .venv
  "$python" -m venv .venv
fi

.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,examples]"

case "$job" in
  demo) exec .venv/bin/python examples/demo.py ;;
  test) exec .venv/bin/python -m pytest -q -n auto tests "$@" ;;
esac
