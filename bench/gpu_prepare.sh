#!/usr/bin/env bash
# Run HERE (the CPU machine, with internet) before a device session: puts into .whl/ (ignored by
# git, carried to the device with `carry: [".whl"]`) the wheels bench/gpu_check.sh installs there:
#   - diffusers 0.42.1 + importlib-metadata 8.7.0 (the device image has diffusers' other needs),
#     for the diffusers baselines and the diffusers-UNet CUDA-graph test;
#   - with PREBUILT=1: a pydiff wheel built for sm_90a against the device's Python 3.12 and
#     torch 2.11.0+cu130 (a venv with them is made in $VENV312 when missing, ~3 GB), which checks
#     here that the CUDA code builds against the device's torch and saves the build there.
#   bash bench/gpu_prepare.sh              (wheels only, seconds)
#   PREBUILT=1 bash bench/gpu_prepare.sh   (plus the pydiff wheel, a few minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2> /dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib-metadata==8.7.0
if [ "${PREBUILT:-0}" = 1 ]; then
  VENV312=${VENV312:-/tmp/pydiff-venv312}
  if [ ! -x "$VENV312/bin/python" ]; then
    PY312=${PY312:-$(command -v python3.12)}
    # (a pyenv shim can exist without that version selected: then a pyenv install of 3.12)
    "$PY312" --version > /dev/null 2>&1 || PY312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2> /dev/null | tail -1)
    "$PY312" -m venv "$VENV312"
    "$VENV312/bin/pip" install -q torch==2.11.0 'numpy<2.3' pybind11 ninja
  fi
  rm -f .whl/pydiff_kernels-*.whl
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYDIFF_CUDA_ARCHS=9.0a MAX_JOBS=${MAX_JOBS:-2} \
    "$VENV312/bin/pip" wheel -q --no-build-isolation --no-deps . -w .whl
  # what the wheel's compiled code was built from: gpu_check.sh builds from source when it differs
  bash bench/gpu_check.sh --source-hash > .whl/pydiff_kernels.source
fi
ls -la .whl
du -sh .whl
