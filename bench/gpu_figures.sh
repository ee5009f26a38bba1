#!/usr/bin/env bash
# The performance issue's accelerator figures on one GPU (or TPU) device, in two calls:
#   PART=1 (training and sampling): a preflight (versions; cuDNN flash attention against
#     XLA's on ADM-64's shapes, which sets DDPM_JAX_ATTENTION=xla if cuDNN fails; a bf16
#     UNet forward), then the train step of cifar10 (batch 128) and imagenet64 (64 per
#     device) in bf16 with a profile, 256 CIFAR-10 images x 1000 ancestral steps,
#     ADM-64 with classifier guidance at 250 steps, cifar10 in float32, imagenet64 with
#     XLA's attention (to compare with cuDNN's).
#   PART=2 (memory): imagenet256's compiled memory with and without remat (autotuning
#     off: it changes no buffer sizes worth counting and most of the compile time),
#     then its train step with remat at batch 32 (the allocator's peak), then the
#     remat policies on imagenet64.
# Items run in priority order; each has its own limit, and none starts past BUDGET
# seconds (default 450) from the script's start. Every log lands in $OUT.
# A lease is 15 device-minutes in all, the machine's start included, and one call at
# most 10: run PART=2 at once after PART=1, while the machine is warm.
#
#   bash bench/gpu_wheels.sh          # here, once: the wheels the device image lacks
#   device run: 'PART=1 bash bench/gpu_figures.sh', carry ['.whl'], timeout_s 480
#   device run: 'PART=2 BUDGET=240 bash bench/gpu_figures.sh', carry ['.whl']
#   SMOKE=1 bash bench/gpu_figures.sh # anywhere: tiny overrides, checks the script runs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_figures}
BUDGET=${BUDGET:-450}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1 && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
bf16=(--override model.dtype=bfloat16)
if [ -n "${SMOKE:-}" ]; then  # Tiny models: minutes on a CPU.
  small=(--override model.base_channels=32)
  adm=(--override model.base_channels=64)
  cls=(--classifier_override model.base_channels=64)
  B128=4; B64=2; B256=2; S1000=3; S250=2; MEM=2
else
  small=(); adm=(); cls=(); B128=128; B64=64; B256=256; S1000=1000; S250=250; MEM=32
fi
cls+=(--classifier_override model.dtype=bfloat16)

item() {  # item NAME SECONDS COMMAND...: runs it, keeps its whole log, shows its end.
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 40 ]; then echo "== $name: skipped, ${left} s of the budget left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit} s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $(( $(date +%s) - START )) s"
  grep -v -i warn "$OUT/$name.log" | tail -n 14
}

if [ "${PART:-1}" = 1 ] || [ -n "${SMOKE:-}" ]; then
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  timeout 120 python3 bench/gpu_preflight.py ${SMOKE:+--small}; echo "preflight exit $?"
} 2>&1 | tee "$OUT/preflight.log"
grep -q '^preflight exit 0' "$OUT/preflight.log" || { echo "preflight failed: stopping"; exit 1; }
grep -q '^cudnn attention: FAILED' "$OUT/preflight.log" && export DDPM_JAX_ATTENTION=xla
item train_cifar10_bf16 120 python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B128 --steps=20 "${bf16[@]}" "${small[@]}" --profile=2
item train_imagenet64_bf16 170 python3 bench/bench_train.py --config=configs/imagenet64.py \
  --batch=$B64 --steps=10 "${bf16[@]}" "${adm[@]}" --profile=2
item sample_cifar10_1000 100 python3 bench/bench_model.py --config=configs/cifar10.py \
  --batch=$B256 --steps=5 --no_train --sample_steps=$S1000 "${bf16[@]}" "${small[@]}"
item sample_adm64_guided 130 python3 bench/bench_model.py --config=configs/imagenet64.py \
  --batch=$B64 --steps=3 --no_train --sample_steps=$S250 "${bf16[@]}" "${adm[@]}" \
  --classifier_config=configs/imagenet64_classifier.py "${cls[@]}"
item train_cifar10_f32 90 python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B128 --steps=20 "${small[@]}"
item train_imagenet64_bf16_xla_attention 150 env DDPM_JAX_ATTENTION=xla \
  python3 bench/bench_train.py --config=configs/imagenet64.py --batch=$B64 --steps=10 \
  "${bf16[@]}" "${adm[@]}"
fi
if [ "${PART:-1}" = 2 ] || [ -n "${SMOKE:-}" ]; then
item memory_imagenet256 150 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  python3 bench/bench_memory.py --config=configs/imagenet256.py --batches=1,2 \
  --device_gb=80 "${bf16[@]}" "${adm[@]}"
item train_imagenet256_remat 150 python3 bench/bench_train.py --config=configs/imagenet256.py \
  --batch=$MEM --steps=3 --override model.remat=True "${bf16[@]}" "${adm[@]}"
item train_imagenet64_save_convs 120 python3 bench/bench_train.py \
  --config=configs/imagenet64.py --batch=$B64 --steps=10 --override model.remat=True \
  --override model.remat_policy=save_convs "${bf16[@]}" "${adm[@]}"
fi
echo "== done after $(( $(date +%s) - START )) s; logs in $OUT"
