#!/usr/bin/env bash
# Is the GPU train step paced by the host's launches? The DDPM CIFAR-10 step (bf16, batch
# 128) with XLA's command buffers (CUDA graphs) as by default, with none, and with more
# kinds of thunk in them; each reports the host's time to issue a step against the step
# (bench_train's dispatch_s_per_step), the one without graphs also a profile whose
# every kernel is named. Compiles overlap; timings take turns (common.device_turn).
#   device run: 'bash bench/gpu_launch.sh', carry ['.whl', '.gpu_cache'], timeout_s <= 600
#   SMOKE=1 bash bench/gpu_launch.sh   # anywhere: a tiny model
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_launch}; LOGS=${LOGS:-/tmp/gpu_launch_logs}
BUDGET=${BUDGET:-170}; START=$(date +%s)
mkdir -p "$OUT" "$LOGS"
. bench/gpu_env.sh  # Wheels, the shared compilation and autotuning cache.
if [ -n "${SMOKE:-}" ]; then args=(--batch=4 --override model.base_channels=32); else args=(--batch=128); fi
SYNC=$(mktemp -d); export BENCH_SYNC_DIR=$SYNC BENCH_SYNC_COUNT=3
export BENCH_SYNC_COMPILE_DEADLINE=$(( START + BUDGET - 60 ))
run() {  # run RANK NAME XLA_FLAGS [bench_train args...]
  local rank=$1 name=$2 flags="${XLA_FLAGS:-} $3"; shift 3
  flags=$(echo $flags)  # No stray blanks: XLA reads a value not starting '--' as a file.
  ( BENCH_SYNC_RANK=$rank XLA_FLAGS="$flags" timeout $(( BUDGET - ($(date +%s) - START) )) \
      python3 bench/bench_train.py --config=configs/cifar10.py --steps=20 \
      --override model.dtype=bfloat16 "${args[@]}" "$@" > "$LOGS/$name.log" 2>&1
    echo "exit $? after $(( $(date +%s) - START )) s" >> "$LOGS/$name.log"; touch "$SYNC/$rank.ended" ) &
}
run 0 graphs_default ''
run 1 graphs_off '--xla_gpu_enable_command_buffer=' --profile=2 --profile_top=25
run 2 graphs_more '--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN'
wait
for name in graphs_off graphs_more graphs_default; do
  echo "== $name"; grep -v -i -E 'warn|cuda_timer|^W[0-9]{4} ' "$LOGS/$name.log" | tail -n 30 | cut -c1-400
done
tar -czf "$OUT/gpu_launch_logs.tar.gz" -C "$LOGS" .
