#!/usr/bin/env bash
# One GPU lease, two stages, each cut off by its own time limit so that what it measured comes back.
#
#   bash benchmarks/gpu_lease.sh OUT_DIR [STAGE1_S] [STAGE2_S]
#
# Stage 1 (issue 16's sections, never measured before this script): decode roofline, prefill
# against the merged concatenation, P = 1k/10k/100k, the split kernel's default against every
# candidate, 200 GPU edits with compilations counted, torch.compile with CUDA graphs.
# Stage 2: the FFN latency table, the fused/unfused crossover, whole-model decode and per-edit
# time, timed again with the kernels as they are now (row-masked value loads).
# Every timed method is checked against its float64 reference before it is timed, and
# split_tuning checks every launch candidate, so a wrong kernel fails the run.
set -u -o pipefail
out=${1:?usage: gpu_lease.sh OUT_DIR [STAGE1_S] [STAGE2_S]}
s1=${2:-330}
s2=${3:-200}
export PYTHONUNBUFFERED=1
src=/tmp/fastpatch-src
rm -rf "$src" && mkdir -p "$src" && cp -r fastpatch "$src"/ && cp -r kernels "$src"/fastpatch/kernels
export PYTHONPATH=$src
mkdir -p "$out/issue16" "$out/latency"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv > "$out/nvidia-smi.csv" 2>&1
timeout "$s1" python3 benchmarks/gpu_check.py --out "$out/issue16" --skip-correctness --no-precompile \
    --sections decode_roofline,prefill,scale,split_tuning,gpu_editing,compiled 2>&1 | tee "$out/issue16/gpu_check.log"
rc1=$?
timeout "$s2" python3 benchmarks/gpu_check.py --out "$out/latency" --skip-correctness --no-precompile \
    --sections ffn_latency,crossover,whole_model,editing 2>&1 | tee "$out/latency/gpu_check.log"
rc2=$?
echo "stage exit codes: issue16=$rc1 latency=$rc2 (124: cut off by its time limit)"
