#!/usr/bin/env bash
# Every GPU benchmark in one call, for a lent GPU machine that has torch but not open_clip:
# installs the wheels carried in .whl/ (open_clip_torch, ftfy, wcwidth, pycocotools), then
# runs the train, inference and loader benchmarks, each under its own time limit, writing
# <name>.json and <name>.log to $OUT (default bench-out/). Usage: bash bench/gpu_suite.sh
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv | tee "$OUT/gpu.txt"

run() {  # name, seconds, script args...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" python3 "$@" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - start)) s"
    tail -c 1500 "$OUT/$name.log"
    echo
}

run infer_latency "${INFER_LIMIT:-120}" bench/infer_latency.py ${INFER_ARGS:-}
run train_throughput "${TRAIN_LIMIT:-300}" bench/train_throughput.py ${TRAIN_ARGS:-}
run loader_throughput "${LOADER_LIMIT:-150}" bench/loader_throughput.py ${LOADER_ARGS:-}
