#!/usr/bin/env bash
# One device call: GPU tests, compute-sanitizer (memcheck, and racecheck of the backward) on a small grid, then
# the bench. Summary last.
# Usage on the GPU machine (device tool), from the repo root:  bash bench/device_check.sh [bench args]
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -m gpu -q --tb=line -p no:cacheprovider tests ${FWAGEN_TESTS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
  tests/test_forward_gpu.py tests/test_backward_gpu.py -k sanitizer 2>&1 | tee "$OUT/sanitizer.log" | tail -5
compute-sanitizer --tool racecheck --error-exitcode 4 python3 -m pytest -q -p no:cacheprovider \
  tests/test_backward_gpu.py -k sanitizer 2>&1 | tee "$OUT/racecheck.log" | tail -5
python3 -m fwagen.bench --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
echo "== summary"; grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -1; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -2
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -2
