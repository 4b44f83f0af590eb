#!/usr/bin/env bash
# Downloads the wheels bench/gpu.sh installs on the GPU machine (bench/gpu-requirements.txt) into .whl/,
# for its platform (Python 3.12, manylinux x86-64), without their dependencies: the image has those.
#
#   bench/gpu_wheels.sh && ls .whl     # then send .whl along with the checkout and run bench/gpu.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl -r bench/gpu-requirements.txt
du -sh .whl
