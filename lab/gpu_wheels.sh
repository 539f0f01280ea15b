#!/usr/bin/env bash
# Run where PyPI is reachable: fetch into .whl/ the packages a bare GPU machine lacks (hydra-core,
# omegaconf, antlr4-python3-runtime, at the versions uv.lock pins) for Python 3.12 on x86-64.
#   bash lab/gpu_wheels.sh
# lab/gpu_check.sh installs them there with pip --no-index into /tmp/site (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pinned() { grep -A1 "^name = \"$1\"" uv.lock | sed -n 's/^version = "\(.*\)"/\1/p'; }
mkdir -p .whl
rm -f .whl/hydra_core-*.whl .whl/omegaconf-*.whl .whl/antlr4_python3_runtime-*.whl  # one version each
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "hydra-core==$(pinned hydra-core)" "omegaconf==$(pinned omegaconf)"
# antlr4-python3-runtime is published as a source archive only: build its pure-Python wheel here
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(pinned antlr4-python3-runtime)"
ls -l .whl
