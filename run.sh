#!/usr/bin/env bash
# cvt_jax launcher: creates .venv on first use, installs the package (editable) with its extras, runs a command.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

usage() {
  cat <<'USAGE'
Usage: ./run.sh COMMAND [ARGS...]

Set-up is automatic: the first call creates .venv with $PYTHON (default python3, e.g. PYTHON=python3.12)
and installs cvt_jax into it (`pip install -e .[tfds,demo]`, plus `[test]` for test and bench) at the
versions of requirements.txt (the environment the suite passed with); later calls reinstall only when
pyproject.toml or requirements.txt change. Every command but test and lock is `.venv/bin/cvt-jax COMMAND`
(./run.sh COMMAND --help for its flags).

Commands of run.sh:
  test        Install the test extras (PyTorch CPU, transformers, ...) and run pytest: the whole suite, or
              the test files and folders named (./run.sh test tests/test_configs.py -k demo).
  lock        Write requirements.txt: the exact versions installed for `test` (run it after a green suite).

Commands of cvt-jax:
USAGE
  cli_python 'print(main.usage().split("commands:\n", 1)[1])'
}

# Runs Python code with `main`, cvt_jax/cli/main.py (standard library only), loaded from the checkout: the
# command list is read before any install.
cli_python() {
  "$PYTHON" -c 'import importlib.util, sys
spec = importlib.util.spec_from_file_location("cvt_jax_cli_main", "cvt_jax/cli/main.py")
main = importlib.util.module_from_spec(spec)
spec.loader.exec_module(main)
'"$1" "${@:2}"
}

# Installs the package with `extras` into $VENV, at requirements.txt's versions, unless the same
# pyproject.toml and requirements.txt were installed already.
ensure_venv() {
  local extras="$1"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[run.sh] creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-${extras//,/-}"
  local digest
  digest="$(cat pyproject.toml requirements.txt | sha256sum | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$digest" ]]; then
    echo "[run.sh] installing cvt_jax[$extras] into $VENV (first time: a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -c requirements.txt -e ".[$extras]"
    echo "$digest" > "$stamp"
  fi
}

# requirements.txt: the exact versions of the test environment, for reproducible installs
# (`pip install -r requirements.txt && pip install -e . --no-deps`); pyproject.toml keeps the ranges.
write_lock() {
  {
    echo "# The environment \`./run.sh test\` passed with ($("$VENV/bin/python" --version), $(uname -m)): pip freeze"
    echo "# of .venv, written by \`./run.sh lock\`. pyproject.toml keeps the version ranges; tests/test_package.py"
    echo "# checks that these pins satisfy them. torch is PyTorch's CPU build (its wheel index:"
    echo "# https://download.pytorch.org/whl/cpu)."
    "$VENV/bin/python" -m pip freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)=='
  } > requirements.txt
  echo "[run.sh] wrote requirements.txt ($(grep -c '==' requirements.txt) pins)" >&2
}

# torchvision's transforms, the reference of the pixel-parity tests (tests/conftest.py), unpacked beside the
# venv rather than installed: PyPI's wheel is built against CUDA torch and breaks imports next to the CPU one.
ensure_torchvision_transforms() {
  local target="$VENV/torchvision-transforms"
  if [[ ! -d "$target/torchvision" ]]; then
    "$VENV/bin/python" -m pip install --quiet --no-deps --target "$target" torchvision==0.28.0
  fi
}

# timm, the official training loop's library (bench/torch_training.py, tests/test_train_parity.py), unpacked
# beside the venv like torchvision's transforms: it requires torchvision, which pip would install (the CUDA
# build); its pure-Python package imports over the transforms above.
ensure_timm() {
  local target="$VENV/timm"
  if [[ ! -d "$target/timm-1.0.31.dist-info" ]]; then
    rm -rf "$target"
    "$VENV/bin/python" -m pip install --quiet --no-deps --target "$target" timm==1.0.31
  fi
}

# libtpu, for the compile-only TPU topologies of the compile tests (tests/test_compile.py), in the version the
# installed jax pins (its `tpu` extra), unpacked beside the venv: installed, every JAX process on this CPU
# host would try to start a TPU first. TPU VMs install `jax[tpu]` instead.
ensure_libtpu() {
  local target="$VENV/libtpu"
  if [[ ! -d "$target/libtpu" ]]; then
    local spec
    spec="$("$VENV/bin/python" -c 'import importlib.metadata as m
print(next(r.split(";")[0].replace(" ", "") for r in m.requires("jax") if r.startswith("libtpu")))')"
    "$VENV/bin/python" -m pip install --quiet --no-deps --target "$target" "$spec"
  fi
}

# XLA's CUDA compiler for `cvt-jax compile --topology h100` on hosts without a GPU (tests/test_compile.py): the
# jax-cuda12 PJRT plugin of the installed jaxlib's version, without CUDA libraries (nothing runs), unpacked
# beside the venv like libtpu (cvt_jax/aot/devices.py looks there). GPU hosts install `jax[cuda12]` instead.
ensure_cuda_compiler() {
  local target="$VENV/cuda-compiler"
  local version
  version="$("$VENV/bin/python" -c 'import jaxlib; print(jaxlib.__version__)')"
  if [[ "$(cat "$target/.jaxlib-version" 2>/dev/null)" != "$version" ]]; then
    rm -rf "$target"
    "$VENV/bin/python" -m pip install --quiet --no-deps --target "$target" \
        "jax-cuda12-plugin==$version" "jax-cuda12-pjrt==$version"
    echo "$version" > "$target/.jaxlib-version"
  fi
}

# XLA:CPU allocates a step's temporaries afresh on every call and glibc hands them back to the kernel on
# free, so every training step faulted them in again (bench/LOG.md). One arena that never
# returns memory reuses the pages. Your own GLIBC_TUNABLES wins; other C libraries ignore it. Not used by
# `test`: a process that never returns memory would hold the suite's peak to the end.
reuse_memory() {
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
[[ "$cmd" == test ]] || reuse_memory
case "$cmd" in
  ""|-h|--help|help) usage ;;
  test)    ensure_venv tfds,demo,test; ensure_torchvision_transforms; ensure_timm; ensure_libtpu; ensure_cuda_compiler
           # no path given, pytest.ini's testpaths (tests/) is the whole suite
           exec "$VENV/bin/python" -m pytest -n auto --dist worksteal "$@" ;;
  lock)    ensure_venv tfds,demo,test; write_lock ;;
  bench)   ensure_venv tfds,demo,test; exec "$VENV/bin/python" -m bench.run "$@" ;;
  compile) ensure_venv tfds,demo; ensure_cuda_compiler; exec "$VENV/bin/cvt-jax" compile "$@" ;;
  *)       if ! cli_python 'sys.exit(sys.argv[1] not in main.COMMANDS)' "$cmd"; then
             echo "run.sh: unknown command '$cmd'" >&2; usage >&2; exit 2
           fi
           ensure_venv tfds,demo; exec "$VENV/bin/cvt-jax" "$cmd" "$@" ;;
esac
