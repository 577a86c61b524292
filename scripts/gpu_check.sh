#!/usr/bin/env bash
# The checks a lent GPU machine runs in one go: the CUDA tests (flash SDPA, flex attention,
# flash-linear-attention kernels, bf16, train.py trainer=gpu) and the GPU benchmark tables.
#   bash scripts/gpu_check.sh [out_dir]          STEPS="probe tests exp10" by default; also
#                                                reference (attnlab vs a bare loop), scaling,
#                                                decode (eager vs compiled decoding, CUDA graphs)
# Packages missing on the machine travel as wheels in .whl/ (installed into /tmp/site). Each step
# has its own time limit, so one slow step still leaves the others' results in out_dir.
# BENCH_EXTRA=bench=quick makes it a quick smoke run of the script itself (also on a CPU).
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
STEPS=${STEPS:-probe tests exp10}
wants() { [[ " $STEPS " == *" $1 "* ]]; }

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

if wants probe; then
step "probe: decoding SDPA backends and the chunked loss on this GPU"
timeout 45 python3 - <<'EOF_PY'
import time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from attnlab.loss import linear_cross_entropy

print("cudnn sdp enabled:", torch.backends.cuda.cudnn_sdp_enabled())
q = torch.randn(1, 4, 1, 32, device="cuda", dtype=torch.bfloat16)
kv = torch.randn(1, 4, 20000, 32, device="cuda", dtype=torch.bfloat16)
restricted = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
def decode_ms(start, backends):
    torch.cuda.synchronize(); t = time.perf_counter()
    for L in range(start, start + 32):
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, kv[:, :, :L], kv[:, :, :L])
    torch.cuda.synchronize(); return (time.perf_counter() - t) / 32 * 1e3
all_backends = restricted + [SDPBackend.CUDNN_ATTENTION]
for name, backends in (("default order", all_backends), ("no cuDNN", restricted), ("default order", all_backends)):
    print(f"decode sdpa, growing key length, {name}: {decode_ms(4096, backends):.3f} ms/call, "
          f"{decode_ms(16384, backends):.3f} ms/call at 16k")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for L in range(5000, 5004):
        F.scaled_dot_product_attention(q, kv[:, :, :L], kv[:, :, :L])
    torch.cuda.synchronize()
print("kernels of plain F.sdpa calls:", sorted({e.name[:70] for e in prof.events() if "CUDA" in str(e.device_type)})[:8])

h = torch.randn(4096, 128, device="cuda", requires_grad=True)
w = torch.randn(50257, 128, device="cuda", requires_grad=True)
t = torch.randint(0, 50257, (4096,), device="cuda")
for chunk in (0, 256, 1024, 4096):
    for i in range(8):
        if i == 3:
            torch.cuda.synchronize(); t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, w, t, chunk_size=chunk).loss_sum
        loss.backward()
    torch.cuda.synchronize()
    print(f"loss fwd+bwd 4096 x 50257, chunk {chunk}: {(time.perf_counter() - t0) / 5 * 1e3:.2f} ms")
EOF_PY
fi

if wants tests; then
step "CUDA tests (fla's Triton kernels compile on first use: minutes)"
timeout 240 python3 -m pytest -v -p no:cacheprovider -n 16 tests/test_cuda.py tests/attention/test_linear.py \
    tests/test_profiling.py -rfE > "$OUT_DIR/pytest.txt" 2>&1; echo "pytest exit $?"
grep -E "FAILED|ERROR|passed|failed" "$OUT_DIR/pytest.txt" | tail -25
fi

if wants exp10; then
step "bench: every mechanism, exp10, bf16"
timeout 240 python3 scripts/bench.py hydra.run.dir="$WORK/exp10" "bench.lengths=[1024,4096]" \
    "bench.attention=[mha,gqa_2,mqa,mla,linear,moh,moh_all,moas,moas_top1,static_moas,identity,sparse_256,sliding_256,moh_static,gqa,sparse_512,sliding_512]" \
    bench.tokens_per_step=16384 "bench.decode_lengths=[4096,16384]" bench.decode_steps=16 bench.repeats=3 ${BENCH_EXTRA:-} 2>&1 | tail -45
cp "$WORK/exp10/bench.json" "$OUT_DIR/exp10.json" 2>/dev/null
fi

if wants reference; then
step "bench: attnlab vs a bare loop, exp10, bf16"
timeout 150 python3 scripts/bench.py hydra.run.dir="$WORK/reference" bench.reference=true \
    "bench.reference_dropouts=[0.1]" ${BENCH_EXTRA:-} 2>&1 | tail -16
cp "$WORK/reference/bench.json" "$OUT_DIR/reference.json" 2>/dev/null
fi

if wants scaling; then
step "bench: scaling with context, vocabulary 256, one sequence"
timeout 240 python3 scripts/bench.py hydra.run.dir="$WORK/scaling" \
    "bench.attention=[mha,mqa,mla,sliding_256,linear,moas,moas_top1,moh,moh_all]" \
    "bench.lengths=[1024,4096,16384]" bench.batch_size=1 "bench.decode_lengths=[4096,16384]" \
    bench.decode_steps=16 model.vocab_size=256 ${BENCH_EXTRA:-} 2>&1 | tail -20
cp "$WORK/scaling/bench.json" "$OUT_DIR/scaling.json" 2>/dev/null
fi

if wants decode; then
step "bench: eager vs compiled decoding (CUDA graphs), vocabulary 256, context 4096, one sequence"
timeout 240 python3 scripts/bench.py hydra.run.dir="$WORK/decode" \
    "bench.attention=[mha,gqa_2,mqa,mla,sliding_256,linear,sparse_256,moh,static_moas]" \
    "bench.lengths=[1024]" bench.batch_size=1 "bench.decode_lengths=[4096]" bench.decode_steps=16 \
    bench.repeats=3 model.vocab_size=256 bench.decode_compile=true ${BENCH_EXTRA:-} 2>&1 | tail -30
cp "$WORK/decode/bench.json" "$OUT_DIR/decode.json" 2>/dev/null
fi

step "done"
} 2>&1 | tee "$LOG"
