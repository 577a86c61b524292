#!/usr/bin/env bash
# The checks a lent GPU machine runs in one go: the CUDA tests (flash SDPA, flex attention,
# flash-linear-attention kernels, bf16, train.py trainer=gpu) and the GPU benchmark tables.
#   bash scripts/gpu_check.sh [out_dir]
# Packages missing on the machine travel as wheels in .whl/ (installed into /tmp/site). Each step
# has its own time limit, so one slow step still leaves the others' results in out_dir.
# BENCH_EXTRA=bench.quick=true makes it a quick smoke run of the script itself (also on a CPU).
set -u
OUT_DIR=${1:-${OUT:-outputs/gpu_check}}
mkdir -p "$OUT_DIR"
WORK=/tmp/attnlab_gpu
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONWARNINGS=ignore
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD/src:$PWD
fi
LOG="$OUT_DIR/log.txt"
step() { echo; echo "=== $1 ($(date +%T))"; }

{
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 - <<'EOF'
import torch, lightning, triton, hydra
from attnlab.attention._gated_delta import FLA_AVAILABLE
import attnlab.attention.sliding as s
print("torch", torch.__version__, "cuda", torch.version.cuda, "lightning", lightning.__version__,
      "triton", triton.__version__, "hydra", hydra.__version__, "fla", FLA_AVAILABLE,
      "flex", s.flex_attention is not None, torch.cuda.get_device_name())
EOF

step "CUDA tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda.py tests/attention/test_linear.py \
    tests/test_profiling.py 2>&1 | tail -40

step "bench: every mechanism, exp10, bf16"
timeout 150 python3 scripts/bench.py hydra.run.dir="$WORK/exp10" "bench.lengths=[256,1024,4096]" \
    bench.tokens_per_step=16384 "bench.decode_lengths=[4096,16384]" ${BENCH_EXTRA:-} 2>&1 | tail -45
cp "$WORK/exp10/bench.json" "$OUT_DIR/exp10.json" 2>/dev/null

step "bench: attnlab vs a bare loop, exp10, bf16"
timeout 90 python3 scripts/bench.py hydra.run.dir="$WORK/reference" bench.reference=true \
    "bench.reference_dropouts=[0.1]" ${BENCH_EXTRA:-} 2>&1 | tail -16
cp "$WORK/reference/bench.json" "$OUT_DIR/reference.json" 2>/dev/null

step "bench: scaling with context, vocabulary 256, one sequence"
timeout 90 python3 scripts/bench.py hydra.run.dir="$WORK/scaling" \
    "bench.attention=[mha,mqa,mla,sliding_256,linear,moas,moas_top1,moh,moh_all]" \
    "bench.lengths=[1024,4096,16384]" bench.batch_size=1 "bench.decode_lengths=[4096,16384]" \
    bench.decode_steps=16 model.vocab_size=256 ${BENCH_EXTRA:-} 2>&1 | tail -20
cp "$WORK/scaling/bench.json" "$OUT_DIR/scaling.json" 2>/dev/null
step "done"
} 2>&1 | tee "$LOG"
