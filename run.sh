#!/usr/bin/env bash
# cvt_jax launcher: creates .venv on first use, installs the requirements, forwards to the entry points.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

usage() {
  cat <<'USAGE'
Usage: ./run.sh COMMAND [ARGS...]

Set-up is automatic: the first call creates .venv with $PYTHON (default python3, e.g. PYTHON=python3.12)
and installs requirements.txt; later calls reinstall only when the requirements change.

Commands:
  demo        Train a small CvT on scikit-learn's digits (offline, a few minutes on a CPU), print val top-1.
  test        Install the test requirements (PyTorch CPU, transformers) and run the whole pytest suite.
  train       python train.py ...      Train/evaluate from a config (./run.sh train --help).
  eval        Evaluate a checkpoint over every image of a split (./run.sh eval --help).
  predict     Top-5 classes of image files (./run.sh predict --help).
  convert     Convert a PyTorch CvT checkpoint (.pth/.bin/.safetensors) to Flax (./run.sh convert --help).
  summary     Parameter count and MACs of a variant (./run.sh summary cvt-13 --res 384).
  bench       Benchmark cvt_jax against PyTorch on this machine (./run.sh bench --help).
USAGE
}

# Installs a requirements file into $VENV unless the same file was installed already.
ensure_venv() {
  local reqs="$1"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[run.sh] creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$(basename "$reqs")"
  local digest
  digest="$(cat "$reqs" requirements.txt | sha256sum | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$digest" ]]; then
    echo "[run.sh] installing $reqs into $VENV (first time: a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$reqs"
    echo "$digest" > "$stamp"
  fi
}

# XLA:CPU allocates a step's temporaries afresh on every call (7.5 GB for a CvT-13 training step at batch
# 32) and glibc hands them back to the kernel on free, so every step faulted them in again, 4 KiB at a time:
# ~1.9 M page faults, a third of the step on a 2-core CPU (bench/README.md). One arena that never returns
# memory (arena_max, mmap_max, trim_threshold) reuses the pages. No glibc.malloc.hugetlb: with the input
# pipeline allocating beside the step it made every other training step twice as slow (bench/README.md).
# Your own GLIBC_TUNABLES wins; other C libraries ignore it. Not used by `test`: the suite was validated
# without it, and a process that never returns memory would hold the suite's peak to the end.
reuse_memory() {
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}"
}

py() { exec "$VENV/bin/python" "$@"; }

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
[[ "$cmd" == test ]] || reuse_memory
case "$cmd" in
  ""|-h|--help|help) usage ;;
  demo)    ensure_venv requirements.txt; py -m cvt_jax.demo "$@" ;;
  test)    ensure_venv requirements-test.txt; py -m pytest tests "$@" ;;
  train)   ensure_venv requirements.txt; py train.py "$@" ;;
  eval)    ensure_venv requirements.txt; py -m cvt_jax.evaluate "$@" ;;
  predict) ensure_venv requirements.txt; py -m cvt_jax.predict "$@" ;;
  convert) ensure_venv requirements.txt; py -m cvt_jax.convert "$@" ;;
  summary) ensure_venv requirements.txt; py -m cvt_jax.summary "$@" ;;
  bench)   ensure_venv requirements-test.txt; py -m bench.run "$@" ;;
  *) echo "run.sh: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
