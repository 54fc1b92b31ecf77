#!/usr/bin/env bash
# One GPU lease, two stages, each cut off by its own time limit so that what it measured comes back.
#
#   bash benchmarks/gpu_lease.sh OUT_DIR [STAGE1_S] [STAGE2_S]
#
# What the next lease should measure (the 2026-12-04 lease measured issue 16's sections and the
# latency tables; see benchmarks/results/nvidia-h200):
# Stage 1: the open questions: which opt-out from Triton's specialisation slows the split
#   fused-FFN kernel (split_specialization), and the 200-edit GPU stream with its compilations
#   counted (gpu_editing), then the decode roofline.
# Stage 2: the full correctness section (every kernel against its float64 reference in fp32 and
#   bf16, every launch candidate), last run on 2026-11-27, after precompiling in 16 processes.
# Every timed method is checked against its float64 reference before it is timed.
# Eight files come back at most: four per stage.
set -u -o pipefail
out=${1:?usage: gpu_lease.sh OUT_DIR [STAGE1_S] [STAGE2_S]}
s1=${2:-300}
s2=${3:-240}
export PYTHONUNBUFFERED=1
src=/tmp/fastpatch-src
rm -rf "$src" && mkdir -p "$src" && cp -r fastpatch "$src"/ && cp -r kernels "$src"/fastpatch/kernels
export PYTHONPATH=$src
mkdir -p "$out/open" "$out/correctness"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv > "$out/open/nvidia-smi.csv" 2>&1
timeout "$s1" python3 benchmarks/gpu_check.py --out "$out/open" --skip-correctness --no-precompile \
    --sections split_specialization,gpu_editing,decode_roofline 2>&1 | tee "$out/open/gpu_check.log"
rc1=$?
timeout "$s2" python3 benchmarks/gpu_check.py --out "$out/correctness" --quick 2>&1 | tee "$out/correctness/gpu_check.log"
rc2=$?
echo "stage exit codes: open=$rc1 correctness=$rc2 (124: cut off by its time limit)"
