#!/usr/bin/env bash
# FLIP's paper regime on MNIST (benchmarks/backdoor_paper.py) on a lent GPU, in one device command (issue 15).
#
#   1. here, once:   bash benchmarks/device_check.sh --prepare        (pydantic's wheels into .whl/)
#                    mkdir -p .devdata && cp -r ../shared/data/mnist .devdata/ && echo /.devdata/ >> .git/info/exclude
#                    (../shared does not travel to the device; 11 MB of MNIST does)
#   2. device tool:  run(command="BUDGET_MIN=8 bash benchmarks/device_flip.sh", carry=[".whl", ".devdata"],
#                        timeout_s=600)
#
# On the device it (a) runs the tests that take $FEDTRUST_TEST_DEVICE on CUDA (recorded inversion steps; with
# FULL_CHECKS=1 also executor equivalence, trigger stamping, augmentation draws; log in equivalence.log;
# tests/algorithms/test_flip_digits.py takes it too but needs more than 80 s there), (b) times the inversion
# eagerly and from CUDA graphs (benchmarks/inversion_graphs.py, SPEED_S seconds at most), then (c) runs the
# paper-regime runs KINDS (default all: flip-dba,fedavg-none,fedavg-dba) of SEEDS (default 0,1,2) on CUDA, all
# at once after their pre-trainings, stopped after BUDGET_MIN minutes. Back in $OUT: $RESULTS.md (default
# backdoor_mnist_paper_gpu.md, the table), inversion_graphs.md, runs.tgz (every run's config, metrics.jsonl,
# summary and log; not the checkpoints, too large to come back), gpu.txt, equivalence.log, speed.log.
# A run moves between machines (backdoor_paper.py resumes on the invocation's device): carry a CPU run's folder
# (WORK=runs/bench-backdoor-paper, carry its flip-dba-s0 and pretrain-s0 folders) and KEEP_CHECKPOINTS=1 brings
# it back with its checkpoint in parts (runs.tgz.part-*), to continue on the CPU or on the next lease.
# Measured (session 34, results/backdoor_mnist_paper_gpu.md): FedAvg 1.2-3.2 s a round, FLIP's first round
# 7-8 min with 11 other runs on the GPU: the paper's 90 FLIP rounds do not fit one lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/fedtrust-device-flip}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no wheels in .whl/: run 'bash benchmarks/device_check.sh --prepare' here and carry .whl"; exit 2; }
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# the CUDA checks first and alone: beside the paper runs (session 34) they did not finish in 200 s.
# Recorded inversion steps (CUDA graphs) against the eager loop, then their speed (results/inversion_graphs.md)
FEDTRUST_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/robust/test_inversion_replay.py \
    > "$OUT/equivalence.log" 2>&1
if [ "${FULL_CHECKS:-0}" = 1 ]; then  # the executor's CUDA equivalences (all passed in session 34, 36 s)
    FEDTRUST_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/fl/test_vectorized.py \
        -k "equals_sequential or chunked" >> "$OUT/equivalence.log" 2>&1
    FEDTRUST_TEST_DEVICE=cuda timeout 60 python3 -m pytest -q -p no:cacheprovider tests/robust/test_triggers.py \
        tests/data/test_augment.py >> "$OUT/equivalence.log" 2>&1
fi
if [ "${SPEED_S:-150}" != 0 ]; then
    timeout "${SPEED_S:-150}" python3 benchmarks/inversion_graphs.py --device cuda --repeats 2 2>&1 | tee "$OUT/speed.log"
    cp benchmarks/results/inversion_graphs.md "$OUT/" 2>/dev/null
fi

status=0
RESULTS="${RESULTS:-backdoor_mnist_paper_gpu}"
WORK="${WORK:-runs/gpu}"
python3 benchmarks/backdoor_paper.py --seeds "${SEEDS:-0,1,2}" --jobs 12 --device cuda --data-root .devdata \
    --work "$WORK" --budget-min "${BUDGET_MIN:-8}" --kinds "${KINDS:-flip-dba,fedavg-none,fedavg-dba}" \
    --results "$RESULTS" 2>&1 | tee "$OUT/paper.log" || status=1
cp "benchmarks/results/$RESULTS.md" "$OUT/" 2>/dev/null || status=1
for log in "$WORK"/*.log; do echo "== $log"; tail -5 "$log"; done > "$OUT/run_tails.txt" 2>&1
if [ "${KEEP_CHECKPOINTS:-0}" = 1 ]; then
    # the runs with their latest checkpoints, to continue elsewhere (one run's FLIP client store grows to tens
    # of MB): in parts of 15 MiB, under the 16 MiB a file can take back. Here: cat runs.tgz.part-* | tar xz
    tar czf - --exclude='*.prev.safetensors' --exclude='report*' --exclude='eval_scores.npz' "$WORK" \
        | split -b 15M - "$OUT/runs.tgz.part-"
else
    # metrics, summaries, configs and logs: with the checkpoints the archive was over the 16 MiB a file can take back
    tar czf "$OUT/runs.tgz" --exclude='*.safetensors' "$WORK"
fi
exit $status
