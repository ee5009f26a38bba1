#!/usr/bin/env bash
# Downloads, into .whl/, the wheels the lent GPU machine lacks (Python 3.12; its image has
# jax with CUDA, flax, optax, orbax, chex, diffrax, but not these), and has git ignore .whl/.
# Run once on this machine before a `device` run that names `.whl` in `carry`:
#     bash bench/gpu_wheels.sh        # ~11 MB
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  ml_collections==1.1.0 tensorflow-datasets==4.9.10 grain==0.2.18 tensorboardX==2.6.5 \
  array-record==0.8.6 portpicker==1.6.0 dm-tree==0.1.10 immutabledict==4.3.1 \
  simple_parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0 \
  googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
python3 -m pip wheel -q --no-deps -w .whl promise==2.3  # Pure Python, published as sdist only.
ls .whl
