#!/usr/bin/env bash
# What issue 5 still waits for on a GPU, in one device call (`bash bench/gpu_pending.sh`; results under $OUT).
# Each step has its own time limit and writes as it goes, so a slow or failing step leaves the others' results.
# Then, if PDL passes and the step is faster with it: make it the default (tandem_kernels/pdl.py, docs).
set -u
OUT=${OUT:-out/gpu_pending}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/device.txt"
# PDL: a captured norm -> GEMV -> rotary+store -> attention chain equals ordinary launches (GPU only)
timeout 120 python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k pdl 2>&1 | tail -5 | tee "$OUT/pdl_tests.txt"
# the engine with PDL against transformers and its CPU path, and R2R's checks
TANDEM_PDL=1 timeout 150 python bench/gpu_check.py --families qwen2 --no-kernel-tests --out "$OUT" >/dev/null
# the whole decode step, 0.5B shape, without and with PDL
for p in 0 1; do
  TANDEM_PDL=$p timeout 120 python bench/decode_step_gpu.py --system tandem --shapes qwen2.5-0.5b --out "$OUT/step_pdl$p" >/dev/null
done
# where the small decode-attention cases lose their time: plain reads of the same bytes beside the kernel
timeout 150 python bench/decode_floor_gpu.py --out "$OUT" >/dev/null
echo "done: $(ls "$OUT")"
