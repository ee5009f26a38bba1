# Sourced by bench/gpu_figures.sh and bench/gpu_launch.sh (after `cd` to the repo root):
# the device image's missing wheels from .whl/ (not under SMOKE), unbuffered Python, no
# preallocation (benchmarks share the GPU), and one JAX compilation cache for every
# process, kept on the machine between calls, with XLA's per-fusion autotuning results
# in $AUTOTUNE_DIR, seeded from $AUTOTUNE_CACHE (default .gpu_cache/autotune, if there:
# an earlier lease's autotune_cache.tar.gz, unpacked and carried).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1 && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ddpm_jax_cache}
AUTOTUNE_DIR=$JAX_COMPILATION_CACHE_DIR/xla_gpu_per_fusion_autotune_cache_dir
AUTOTUNE_CACHE=${AUTOTUNE_CACHE:-.gpu_cache/autotune}
mkdir -p "$AUTOTUNE_DIR"
if [ -d "$AUTOTUNE_CACHE" ]; then
  cp -r "$AUTOTUNE_CACHE"/. "$AUTOTUNE_DIR"/
  echo "autotune cache: $(find "$AUTOTUNE_DIR" -type f | wc -l) entries"
fi
