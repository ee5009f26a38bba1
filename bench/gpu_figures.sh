#!/usr/bin/env bash
# The performance issue's accelerator figures on one GPU, in one call of <= 10 minutes.
#
# A preflight first (versions; cuDNN flash attention against XLA's on ADM-64's and DDPM
# CIFAR-10's attention shapes, which sets DDPM_JAX_ATTENTION=xla if cuDNN fails; a bf16
# UNet forward; the script stops if that fails). Then every benchmark starts at once:
# their compiles overlap (on an H200 with jax 0.11.2 the cifar10 train step took 56 s
# to compile and imagenet64's over 200 s), and `common.device_turn` lets them time
# one at a time, in the order below, once every one has compiled, so that no
# compile's autotuning shares the GPU with a timing (or once TIMING seconds, default
# 150, are all that is left of the budget). Each benchmark's process is stopped
# BUDGET seconds (default 520) after the script starts. Every log lands in $LOGS
# (default /tmp/gpu_figures_logs), the end of each is printed (the first last), and
# all of them are packed into $OUT/gpu_figures_logs.tar.gz (the device tool brings
# back at most 8 files).
#   0 train_imagenet64_bf16   64 per device, with a profile (top ops)
#   1 train_cifar10_bf16      batch 128, with a profile
#   2 sample_adm64_guided     ADM-64 + classifier guidance, 250 steps, batch 64
#   3 sample_cifar10_1000     256 images x 1000 ancestral steps
#   4 train_cifar10_f32
#   5 train_imagenet64_xla_attention   (to compare with cuDNN's)
#   6 train_imagenet64_save_convs      (remat policy)
#   7 train_imagenet256_remat batch 32 per device (the allocator's peak)
#   - memory_imagenet256      compiled memory with and without remat (autotuning off:
#                             compile only, no timing)
#
#   bash bench/gpu_wheels.sh          # here, once: the wheels the device image lacks
#   device run: 'bash bench/gpu_figures.sh', carry ['.whl'], timeout_s 600
#   SMOKE=1 bash bench/gpu_figures.sh # anywhere: tiny overrides, checks the script runs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_figures}
LOGS=${LOGS:-/tmp/gpu_figures_logs}
BUDGET=${BUDGET:-520}
TIMING=${TIMING:-150}
START=$(date +%s)
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1 && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
bf16=(--override model.dtype=bfloat16)
if [ -n "${SMOKE:-}" ]; then  # Tiny models: minutes on a CPU.
  small=(--override model.base_channels=32)
  adm=(--override model.base_channels=64)
  cls=(--classifier_override model.base_channels=64)
  B128=4; B64=2; B256=2; S1000=3; S250=2; MEM=2; PRE=--small
else
  small=(); adm=(); cls=(); B128=128; B64=64; B256=256; S1000=1000; S250=250; MEM=32; PRE=
fi
cls+=(--classifier_override model.dtype=bfloat16)

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  timeout 120 python3 bench/gpu_preflight.py $PRE; echo "preflight exit $?"
} 2>&1 | tee "$LOGS/preflight.log"
if ! grep -q '^preflight exit 0' "$LOGS/preflight.log"; then
  cp "$LOGS/preflight.log" "$OUT/"; echo "preflight failed: stopping"; exit 1
fi
grep -q '^cudnn attention: FAILED' "$LOGS/preflight.log" && export DDPM_JAX_ATTENTION=xla

SYNC=$(mktemp -d)
NAMES=()
launch() {  # launch NAME COMMAND...: starts it in the background with the next rank.
  local name=$1 rank=${#NAMES[@]}; shift
  NAMES+=("$name")
  local left=$(( BUDGET - ($(date +%s) - START) ))
  ( BENCH_SYNC_DIR=$SYNC BENCH_SYNC_RANK=$rank timeout "$left" "$@" > "$LOGS/$name.log" 2>&1
    echo "exit $? after $(( $(date +%s) - START )) s" >> "$LOGS/$name.log"
    touch "$SYNC/$rank.ended" ) &
}
export BENCH_SYNC_COUNT=8 BENCH_SYNC_COMPILE_DEADLINE=$(( START + BUDGET - TIMING ))
launch train_imagenet64_bf16 python3 bench/bench_train.py --config=configs/imagenet64.py \
  --batch=$B64 --steps=10 "${bf16[@]}" "${adm[@]}" --profile=2
launch train_cifar10_bf16 python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B128 --steps=20 "${bf16[@]}" "${small[@]}" --profile=2
launch sample_adm64_guided python3 bench/bench_model.py --config=configs/imagenet64.py \
  --batch=$B64 --steps=3 --no_train --sample_steps=$S250 "${bf16[@]}" "${adm[@]}" \
  --classifier_config=configs/imagenet64_classifier.py "${cls[@]}"
launch sample_cifar10_1000 python3 bench/bench_model.py --config=configs/cifar10.py \
  --batch=$B256 --steps=5 --no_train --sample_steps=$S1000 "${bf16[@]}" "${small[@]}"
launch train_cifar10_f32 python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B128 --steps=20 "${small[@]}"
launch train_imagenet64_xla_attention env DDPM_JAX_ATTENTION=xla python3 \
  bench/bench_train.py --config=configs/imagenet64.py --batch=$B64 --steps=10 \
  "${bf16[@]}" "${adm[@]}"
launch train_imagenet64_save_convs python3 bench/bench_train.py \
  --config=configs/imagenet64.py --batch=$B64 --steps=10 --override model.remat=True \
  --override model.remat_policy=save_convs "${bf16[@]}" "${adm[@]}"
launch train_imagenet256_remat python3 bench/bench_train.py --config=configs/imagenet256.py \
  --batch=$MEM --steps=3 --override model.remat=True "${bf16[@]}" "${adm[@]}"
[ "${#NAMES[@]}" = "$BENCH_SYNC_COUNT" ] || echo "BENCH_SYNC_COUNT is not ${#NAMES[@]}"
( timeout $(( BUDGET - ($(date +%s) - START) )) env \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" python3 bench/bench_memory.py \
    --config=configs/imagenet256.py --batches=1,2 --device_gb=80 "${bf16[@]}" "${adm[@]}" \
    > "$LOGS/memory_imagenet256.log" 2>&1
  echo "exit $? after $(( $(date +%s) - START )) s" >> "$LOGS/memory_imagenet256.log" ) &
wait
# Last priority first: the reply keeps the end of the output.
for name in memory_imagenet256 $(printf '%s\n' "${NAMES[@]}" | tac); do
  echo "== $name"
  grep -v -i -E 'warn|cuda_timer|^W[0-9]{4} ' "$LOGS/$name.log" | tail -n 12
done
tar -czf "$OUT/gpu_figures_logs.tar.gz" -C "$LOGS" .
echo "== done after $(( $(date +%s) - START )) s; logs in $LOGS and $OUT/gpu_figures_logs.tar.gz"
