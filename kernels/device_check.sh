#!/usr/bin/env bash
# Every GPU check and benchmark megatron-sz needs, in ONE prepared run (issue 18):
#
#   bash kernels/device_check.sh            # on a GPU machine (e.g. the lent H200), full sizes
#   bash kernels/device_check.sh --smoke    # on CPU: the same steps at tiny sizes (tested in CI)
#
# The run fits one device call: BUDGET seconds in all (default 540; the lent machine
# allows 600 per command). Steps run in priority order, each with its own limit, and a
# step whose limit no longer fits the remaining budget is skipped (and says so), so a
# slow step never starves the ones after it of their results:
#   1. environment: GPU name, torch / triton / megatron-core / TE versions, git commit
#   2. correctness on this device: Triton kernels vs float64 (incl. main_grad fusion, the
#      in-place bf16 dlogits and the saved-dlogits backward), SDPA/varlen attention parity,
#      bf16 norms
#   3. kernel benchmark: dpo, wsft, logprobs, pg at N=8192, H=4096, V=151936, bf16 vs eager,
#      torch.compile and Liger (when importable), forward-only rows and the main_grad path
#      -> bench_kernels.csv
#   4. training benchmark: solver-dpo at the Qwen3-1.7B shape, seq 2048, micro-batch 4 and 2
#      -> train_bench.csv (MFU = model FLOPs per token x tokens/s / peak; see
#      megatron_sz/train/metrics.py); then the A/B rows: Megatron's fp32-weight torch norms
#      (MEGATRON_SZ_TORCH_NORMS=1) and packed vs padded batches of mixed lengths
#   5. rms_norm micro-benchmark, fp32 vs bf16 weight -> norm_bench.csv
#
# Results go to $OUT (default: kernels/results/run-<date>) with env.txt; commit them as
# kernels/results/<gpu>-<date>-*.csv. On a machine without pip access, carry wheels in a
# folder and point SITE at it (megatron-core 0.16.x, liger-kernel, math-verify,
# sentencepiece >= 0.2.3: see ../shared/design/ENVIRONMENT.md); the checkout itself works
# from PYTHONPATH (kernels/ is copied to megatron_sz/kernels when not installed).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
OUT="${OUT:-kernels/results/run-$(date -u +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
if [[ -n "${SITE:-}" ]]; then export PYTHONPATH="$SITE:${PYTHONPATH:-}"; fi
if ! python3 -c "import megatron_sz.kernels" 2>/dev/null; then
  cp -r kernels megatron_sz/kernels && export PYTHONPATH="$PWD:${PYTHONPATH:-}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
status=0
BUDGET="${BUDGET:-540}"
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, keep going
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if (( left < limit / 2 )); then
    echo "== $name skipped: ${left}s of the ${BUDGET}s budget left, it needs up to ${limit}s"
    echo "skipped: budget" >"$OUT/$name.log"; status=1; return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s; tail:"; tail -n 5 "$OUT/$name.log" | sed 's/^/   /'
  [[ $rc -ne 0 ]] && status=1
  return 0
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || rocm-smi --showproductname 2>/dev/null || echo "gpu: none"
  python3 - <<'EOF'
import importlib
for m in ("torch", "triton", "megatron.core", "transformer_engine", "liger_kernel", "sentencepiece"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(m, "missing:", type(exc).__name__)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ $SMOKE == 1 ]]; then
  step tests 600 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py tests/test_norm.py \
    tests/test_kernels_grads.py tests/test_kernels.py -k "not independent" -m "not slow"
  step bench_kernels 300 python3 -m megatron_sz bench-kernels --device cpu --tokens 64 --hidden 32 \
    --vocab 300 --warmup 1 --reps 2 --csv "$OUT/bench_kernels.csv"
  step train_bench 600 python3 -m megatron_sz.train.bench --model tiny --seq 64 --steps 3 --warmup 1 \
    --micro-batch 2 --global-batch 4 --csv "$OUT/train_bench.csv"
  step train_bench_packed 600 python3 -m megatron_sz.train.bench --model tiny --seq 64 --steps 3 \
    --warmup 1 --micro-batch 2 --global-batch 4 --lengths mixed --batching packed --csv "$OUT/train_bench.csv"
  step norm_bench 60 python3 -m megatron_sz.megatron.norm --csv "$OUT/norm_bench.csv"
else
  step tests 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_grads.py tests/test_kernels.py \
    tests/test_attention.py tests/test_norm.py
  step bench_kernels 200 python3 -m megatron_sz bench-kernels --tokens 8192 --hidden 4096 --vocab 151936 \
    --dtype bf16 --warmup 3 --reps 10 --csv "$OUT/bench_kernels.csv"
  TRAIN=(python3 -m megatron_sz.train.bench --model qwen3-1.7b --seq 2048 --steps 6 --warmup 2
         --csv "$OUT/train_bench.csv")
  step train_bench_mb4 80 "${TRAIN[@]}" --micro-batch 4 --global-batch 16
  step train_bench_mb2 70 "${TRAIN[@]}" --micro-batch 2 --global-batch 8
  step train_bench_torch_norms 70 env MEGATRON_SZ_TORCH_NORMS=1 "${TRAIN[@]}" --micro-batch 2 \
    --global-batch 8 --label torch-norms
  step train_bench_mixed_padded 60 "${TRAIN[@]}" --micro-batch 4 --global-batch 16 --lengths mixed
  step train_bench_mixed_packed 60 "${TRAIN[@]}" --micro-batch 4 --global-batch 16 --lengths mixed \
    --batching packed
  step norm_bench 20 python3 -m megatron_sz.megatron.norm --csv "$OUT/norm_bench.csv"
fi
echo "results in $OUT (status $status)"
exit $status
