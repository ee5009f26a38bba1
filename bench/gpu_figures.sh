#!/usr/bin/env bash
# The performance issue's accelerator figures on one GPU, in one call of <= 10 minutes.
#
# Every benchmark starts at once, a preflight beside them (versions; cuDNN flash
# attention against XLA's on ADM-64's and DDPM CIFAR-10's attention shapes; a bf16 UNet
# forward): their compiles overlap (on an H200 with jax 0.11.2 the cifar10 train step
# took 56 s to compile and imagenet64's over 200 s), and `common.device_turn` lets them
# time one at a time, in the order below, once every one has compiled, so that no
# compile's autotuning shares the GPU with a timing (or once TIMING seconds, default
# 150, are all that is left of the budget). Each benchmark's process is stopped
# BUDGET seconds (default 530) after the script starts. Every log lands in $LOGS
# (default /tmp/gpu_figures_logs), the end of each is printed (the first last), and
# all of them are packed into $OUT/gpu_figures_logs.tar.gz (the device tool brings
# back at most 8 files). All processes share one JAX compilation cache on the machine,
# with XLA's per-fusion autotuning results, packed into $OUT/autotune_cache.tar.gz.
#   0 train_cifar10_bf16      batch 128 (the baseline of 1)
#   1 train_cifar10_gn_one_pass        DDPM_JAX_GROUP_NORM=one_pass (layers.group_norm_statistics)
#   2 train_imagenet64_bf16   64 per device
#   3 train_imagenet64_gn_one_pass     likewise
#   4 train_imagenet64_xla_attention   (to compare with cuDNN's)
#   5 sample_adm64_guided     ADM-64 + classifier guidance, 250 steps, batch 64
#   6 train_imagenet64_save_convs      (remat policy)
#   7 train_cifar10_f32       batch 128
#   8 train_cifar10_bf16_b256
#   9 train_imagenet256_remat batch 32 per device (the allocator's peak)
#  10 train_cifar10_clip_groups  cifar10.py as published: DDPM's per-replica clipping
#                             (optim.grad_clip_groups=8; the others time the plain step)
#  11 profile_cifar10_bf16    batch 128, command buffers off, top ops
#  12 profile_imagenet64_bf16 likewise
#   - memory_imagenet256      compiled memory with and without remat (autotuning off:
#                             compile only, no timing)
# RERUN=1 (a second call on the still-warm machine, BUDGET set to what the lease has
# left) runs what has not yet succeeded, from the cached compiles.
# (2026-11-30 measured the CIFAR-10 bf16 step at batch 128 alone: bench/gpu_launch.sh.)
# AUTOTUNE_CACHE=DIR (default .gpu_cache/autotune, if there: carry it; bench/gpu_env.sh)
# seeds XLA's autotuning with an earlier lease's results (unpack its
# autotune_cache.tar.gz there): with them ADM-64's train step compiled in 50 s instead of 230 s. Compiles that overlap
# autotune beside each other, and a benchmark timed before the others have compiled
# (past the deadline) shares the GPU with their autotuning: 2026-11-30 the CIFAR-10
# step read 28.7 ms so, 21.2 ms alone. On a GPU the profile sees each command buffer
# (CUDA graph) as one event; for a profile naming every kernel, run bench_train.py
# --profile with XLA_FLAGS=--xla_gpu_enable_command_buffer= (bench/gpu_launch.sh).
#
#   bash bench/gpu_wheels.sh          # here, once: the wheels the device image lacks
#   device run: 'bash bench/gpu_figures.sh', carry ['.whl', '.gpu_cache'], timeout_s 600
#   then at once: 'RERUN=1 BUDGET=<s> TIMING=<s> bash bench/gpu_figures.sh'
#   SMOKE=1 bash bench/gpu_figures.sh # anywhere: tiny overrides, checks the script runs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_figures}
LOGS=${LOGS:-/tmp/gpu_figures_logs}
BUDGET=${BUDGET:-530}
TIMING=${TIMING:-150}
START=$(date +%s)
mkdir -p "$OUT" "$LOGS"
. bench/gpu_env.sh  # Wheels, the shared compilation and autotuning cache.
bf16=(--override model.dtype=bfloat16)
if [ -n "${SMOKE:-}" ]; then  # Tiny models: minutes on a CPU.
  small=(--override model.base_channels=32)
  adm=(--override model.base_channels=64)
  cls=(--classifier_override model.base_channels=64)
  B128=4; B64=2; B256=2; S250=2; MEM=2; PRE=--small; CLIP_GROUPS=2
else
  small=(); adm=(); cls=(); B128=128; B64=64; B256=256; S250=250; MEM=32; PRE=; CLIP_GROUPS=8
fi
cls+=(--classifier_override model.dtype=bfloat16)

if [ -z "${RERUN:-}" ]; then  # Beside the compiles: it times nothing we report.
  ( { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
      timeout 150 python3 bench/gpu_preflight.py $PRE; echo "preflight exit $?"
    } > "$LOGS/preflight.log" 2>&1 ) &
fi

SYNC=$(mktemp -d)
NAMES=()
skip() {  # skip NAME: true on a RERUN call if NAME succeeded before; else keeps its old log.
  [ -n "${RERUN:-}" ] && grep -q '^exit 0 after' "$LOGS/$1.log" 2>/dev/null && return 0
  [ -f "$LOGS/$1.log" ] && mv "$LOGS/$1.log" "$LOGS/$1.first.log"
  return 1
}
job() {  # job NAME COMMAND...: starts it in the background with the next rank.
  local name=$1 rank=${#NAMES[@]}; shift
  NAMES+=("$name")
  if skip "$name"; then touch "$SYNC/$rank.ended"; return; fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  ( BENCH_SYNC_DIR=$SYNC BENCH_SYNC_RANK=$rank timeout "$left" "$@" > "$LOGS/$name.log" 2>&1
    echo "exit $? after $(( $(date +%s) - START )) s" >> "$LOGS/$name.log"
    touch "$SYNC/$rank.ended" ) &
}
export BENCH_SYNC_COUNT=13 BENCH_SYNC_COMPILE_DEADLINE=$(( START + BUDGET - TIMING ))
job train_cifar10_bf16 python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B128 --steps=20 "${bf16[@]}" "${small[@]}"
job train_cifar10_gn_one_pass env DDPM_JAX_GROUP_NORM=one_pass python3 \
  bench/bench_train.py --config=configs/cifar10.py --batch=$B128 --steps=20 \
  "${bf16[@]}" "${small[@]}"
job train_imagenet64_bf16 python3 bench/bench_train.py --config=configs/imagenet64.py \
  --batch=$B64 --steps=10 "${bf16[@]}" "${adm[@]}"
job train_imagenet64_gn_one_pass env DDPM_JAX_GROUP_NORM=one_pass python3 \
  bench/bench_train.py --config=configs/imagenet64.py --batch=$B64 --steps=10 \
  "${bf16[@]}" "${adm[@]}"
job train_imagenet64_xla_attention env DDPM_JAX_ATTENTION=xla python3 \
  bench/bench_train.py --config=configs/imagenet64.py --batch=$B64 --steps=10 \
  "${bf16[@]}" "${adm[@]}"
job sample_adm64_guided python3 bench/bench_model.py --config=configs/imagenet64.py \
  --batch=$B64 --steps=3 --no_train --sample_steps=$S250 "${bf16[@]}" "${adm[@]}" \
  --classifier_config=configs/imagenet64_classifier.py "${cls[@]}"
job train_imagenet64_save_convs python3 bench/bench_train.py \
  --config=configs/imagenet64.py --batch=$B64 --steps=10 --override model.remat=True \
  --override model.remat_policy=save_convs "${bf16[@]}" "${adm[@]}"
job train_cifar10_f32 python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B128 --steps=20 "${small[@]}"
job train_cifar10_bf16_b256 python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B256 --steps=20 "${bf16[@]}" "${small[@]}"
job train_imagenet256_remat python3 bench/bench_train.py --config=configs/imagenet256.py \
  --batch=$MEM --steps=3 --override model.remat=True "${bf16[@]}" "${adm[@]}"
job train_cifar10_clip_groups python3 bench/bench_train.py --config=configs/cifar10.py \
  --batch=$B128 --steps=20 --override optim.grad_clip_groups=$CLIP_GROUPS "${bf16[@]}" \
  "${small[@]}"
# Profiles without command buffers (every kernel named; slower steps, so apart).
job profile_cifar10_bf16 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
  python3 bench/bench_train.py --config=configs/cifar10.py --batch=$B128 --steps=5 \
  "${bf16[@]}" "${small[@]}" --profile=2 --profile_top=60
job profile_imagenet64_bf16 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
  python3 bench/bench_train.py --config=configs/imagenet64.py --batch=$B64 --steps=3 \
  "${bf16[@]}" "${adm[@]}" --profile=2 --profile_top=60
[ "${#NAMES[@]}" = "$BENCH_SYNC_COUNT" ] || echo "BENCH_SYNC_COUNT is not ${#NAMES[@]}"
if ! skip memory_imagenet256; then
  ( timeout $(( BUDGET - ($(date +%s) - START) )) env JAX_COMPILATION_CACHE_DIR= \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" python3 bench/bench_memory.py \
      --config=configs/imagenet256.py --batches=1,2 --device_gb=80 "${bf16[@]}" "${adm[@]}" \
      > "$LOGS/memory_imagenet256.log" 2>&1
    echo "exit $? after $(( $(date +%s) - START )) s" >> "$LOGS/memory_imagenet256.log" ) &
fi
wait
# Last priority first: the reply keeps the end of the output.
for name in preflight memory_imagenet256 $(printf '%s\n' "${NAMES[@]}" | tac); do
  [ -f "$LOGS/$name.log" ] || continue
  echo "== $name"
  grep -v -i -E 'warn|cuda_timer|^W[0-9]{4} ' "$LOGS/$name.log" | tail -n 12
done
tar -czf "$OUT/gpu_figures_logs.tar.gz" -C "$LOGS" .
tar -czf "$OUT/autotune_cache.tar.gz" -C "$AUTOTUNE_DIR" . 2>/dev/null
echo "autotune cache: $(find "$AUTOTUNE_DIR" -type f | wc -l) entries, $(du -sh "$JAX_COMPILATION_CACHE_DIR" | cut -f1) in all"
echo "== done after $(( $(date +%s) - START )) s; logs in $LOGS and $OUT/gpu_figures_logs.tar.gz"
