#!/usr/bin/env bash
# The performance issue's accelerator figures in one run on one GPU (or TPU) device:
# train-step throughput and fraction of peak (cifar10 at its published batch, float32 and
# bfloat16; imagenet64 at 64 per device, with a profile), 256 CIFAR-10 images x 1000
# ancestral steps, ADM-64 with classifier guidance at 250 steps, and imagenet256's memory
# (compiled estimate with and without remat, then the allocator's peak at a batch).
# Every log lands in $OUT; each item has its own time limit so one stall costs only it.
# Part 1 (training and sampling, <= 9 min) comes first; part 2 (memory, <= 6 min) only
# if device time is left. A lease is 15 device-minutes in all, the machine's start
# included, and one call at most 10.
#
#   bash bench/gpu_wheels.sh          # here, once: the wheels the device image lacks
#   device run: 'PART=1 bash bench/gpu_figures.sh', carry ['.whl'], timeout_s 600
#   device run: 'PART=2 bash bench/gpu_figures.sh', carry ['.whl'], timeout_s 420
#   SMOKE=1 bash bench/gpu_figures.sh # anywhere: tiny overrides, checks the script runs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_figures}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1 && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if [ -n "${SMOKE:-}" ]; then  # Tiny models: minutes on a CPU.
  small=(--override model.base_channels=32)
  adm=(--override model.base_channels=64)
  cls=(--classifier_override model.base_channels=64)
  B128=4; B64=2; B256=2; S1000=3; S250=2; MEM=1
else
  small=(); adm=(); cls=(); B128=128; B64=64; B256=256; S1000=1000; S250=250; MEM=16
fi

item() {  # item NAME SECONDS COMMAND...: runs it, keeps its whole log, shows its end.
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S)): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $?"
  grep -v -i warn "$OUT/$name.log" | tail -n 14
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python3 -c 'import jax, jaxlib; print("jax", jax.__version__, jaxlib.__version__, jax.devices())'
} 2>&1 | tee "$OUT/device.txt"

if [ "${PART:-1}" = 1 ] || [ -n "${SMOKE:-}" ]; then
item train_cifar10_f32 90 python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B128 --steps=20 "${small[@]}"
item train_cifar10_bf16 110 python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B128 --steps=20 --override model.dtype=bfloat16 "${small[@]}" --profile=2
item train_imagenet64 140 python3 bench/bench_train.py --config=configs/imagenet64.py \
  --batch=$B64 --steps=10 --profile=2 "${adm[@]}"
item sample_cifar10_1000 90 python3 bench/bench_model.py --config=configs/cifar10.py \
  --batch=$B256 --steps=5 --sample_steps=$S1000 "${small[@]}"
item sample_adm64_guided 110 python3 bench/bench_model.py --config=configs/imagenet64.py \
  --batch=$B64 --steps=3 --sample_steps=$S250 "${adm[@]}" \
  --classifier_config=configs/imagenet64_classifier.py "${cls[@]}"
fi
if [ "${PART:-1}" = 2 ] || [ -n "${SMOKE:-}" ]; then
item memory_imagenet256 200 python3 bench/bench_memory.py --config=configs/imagenet256.py \
  --batches=1,2 --device_gb=80 "${adm[@]}"
item train_imagenet256_remat 150 python3 bench/bench_train.py --config=configs/imagenet256.py \
  --batch=$MEM --steps=3 --override model.remat=True "${adm[@]}"
fi
echo "== done ($(date -u +%H:%M:%S)); logs in $OUT"
