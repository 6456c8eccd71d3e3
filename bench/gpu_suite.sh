#!/usr/bin/env bash
# Every GPU benchmark in one call, for a lent GPU machine that has torch but not open_clip:
# installs the wheels carried in $WHEELS (default .whl/: open_clip_torch, ftfy, wcwidth,
# pycocotools) for $PYTHON (default python3, the one that holds torch there), then
# runs the benchmarks named in $BENCHES (default: train warm infer; also: loader, features),
# each under its own time limit, writing <name>.json and <name>.log to $OUT (default
# bench-out/). The train and infer scripts save their figures as they go, so a limit that
# ends one keeps the rest. `warm` trains the compiled mode again in a fresh process: its
# first step shows the compile time with inductor's on-disk cache filled by `train`, as a
# second training run on the same machine sees it.
# Usage: bash bench/gpu_suite.sh   (sized for one 600 s call; see BENCHMARKS.md)
set -uo pipefail
OUT=${OUT:-bench-out} WHEELS=${WHEELS:-.whl} PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv | tee "$OUT/gpu.txt"
fi

run() {  # name, seconds, script args...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$PYTHON" "$@" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - start)) s"
    tail -c 1500 "$OUT/$name.log"
    echo
}

TRAIN_MODES=reference,fast,fast_compiled,fast_ckpt_decoder,fast_compiled_ckpt_decoder
for bench in ${BENCHES:-train warm infer}; do
    case $bench in
    train) run train_throughput "${TRAIN_LIMIT:-330}" bench/train_throughput.py \
        ${TRAIN_ARGS:---modes $TRAIN_MODES --curve-steps 0} ;;
    warm) run train_throughput_warm "${WARM_LIMIT:-80}" bench/train_throughput.py \
        ${WARM_ARGS:---modes fast_compiled --curve-steps 0} ;;
    infer) run infer_latency "${INFER_LIMIT:-180}" bench/infer_latency.py \
        ${INFER_ARGS:---variants compiled,overlap,compiled+overlap --calls 20 --blocks 3} ;;
    loader) run loader_throughput "${LOADER_LIMIT:-150}" bench/loader_throughput.py \
        ${LOADER_ARGS:-} ;;
    features) run feature_loader_throughput "${FEATURES_LIMIT:-360}" \
        bench/feature_loader_throughput.py ${FEATURES_ARGS:---device cuda --pin \
        --workers 0,4,8,16 --images 600 --samples 8192 --seconds 6} ;;
    *) echo "unknown benchmark $bench (train, warm, infer, loader, features)" >&2; exit 2 ;;
    esac
done
