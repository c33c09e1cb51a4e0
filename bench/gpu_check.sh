#!/usr/bin/env bash
# One-command GPU check (H100/H200): build the extension for sm_90a only, run the GPU tests and the
# benchmarks, print a short table. Meant for the device machine: ~3-5 minutes.
#   bash bench/gpu_check.sh            (results under ${OUT:-bench/results})
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-bench/results}
mkdir -p "$OUTDIR"
export PYDIFF_CUDA_ARCHS=${PYDIFF_CUDA_ARCHS:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps . > "$OUTDIR/build.log" 2>&1 || { tail -40 "$OUTDIR/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
(cd /tmp && python3 -c "import pydiff; print(pydiff.build_info())")
(cd tests && python3 -m pytest -q -p no:cacheprovider test_solver_gpu.py test_sampling_gpu.py test_invertible_gpu.py test_quant_gpu.py test_quant_triton.py test_quant_fused.py test_solver_op.py test_sampling.py) 2>&1 | tail -15 | tee "$OUTDIR/gpu_tests.log"
python3 bench/run.py --out "$OUTDIR" 2>&1 | tee "$OUTDIR/bench.log" | grep -v "^W1"
echo "total: $(( $(date +%s) - t0 )) s"
