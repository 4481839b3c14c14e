#!/usr/bin/env bash
# The GPU checks of issue 4 in one command, for a task that is lent a device machine (about 10 minutes
# of an H200; its image has torch but not pydantic, and reaches no package index).
#
#   1. here, once:   bash benchmarks/device_check.sh --prepare   (pydantic's wheels for the device's
#                    Python 3.12 into .whl/, which .gitignore keeps out of git)
#   2. device tool:  run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
#
# On the device it (a) runs the executor-equivalence tests (vectorised == sequential in float64,
# chunked groups included) on CUDA, and (b) runs benchmarks/speed.py on CUDA: W, the scaling sweep and
# pfl-research's CIFAR-10 shape on synthetic images (../shared does not travel; 72 MB of CIFAR is over
# the 64 MiB carry limit), one repeat, without Flower and pfl (neither is installed there).
# Everything lands in $OUT: equivalence.log, speed-cuda.md/.json, speed.log. Copy speed-cuda.md to
# benchmarks/results/ and read it against the CPU run in speed.md.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
fi

OUT="${OUT:-/tmp/fedtrust-device-check}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no wheels in .whl/: run 'bash benchmarks/device_check.sh --prepare' here and carry .whl"; exit 2; }
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 FEDTRUST_TEST_DEVICE=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/fl/test_vectorized.py \
    -k "equals_sequential or chunked" 2>&1 | tee "$OUT/equivalence.log" || status=1

timeout 360 python3 benchmarks/speed.py --device cuda --no-install --cifar synthetic --rounds 50 --repeats 1 \
    --only w-vectorized,w-sequential,w-paper,w-central-b10,w-central-b100,scaling,cifar-vectorized,cifar-sequential \
    --profile --out "$OUT/speed-cuda.md" 2>&1 | tee "$OUT/speed.log" || status=1
exit $status
