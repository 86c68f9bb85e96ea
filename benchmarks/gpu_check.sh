#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one command, without network:
#
#   benchmarks/gpu_check.sh OUTDIR [STAGE ...]
#
# STAGE: env, install, tests, gputests, sweep, bench, bench-methods, bench-lm (default: all of
# them, in that order), overhead (host work per call on CUDA), fast (for a short loan: `env
# install fast` takes about 10 minutes). Builds the package from source against the torch already installed (no pip registry
# needed), runs the test suite with CUDA visible, the GPU-only tests, the tuning sweep and the
# benchmark grid, and writes every log, CSV, table and plot under OUTDIR. Wheels in .whl/ (e.g.
# Liger-Kernel, for the benchmark) are installed into a private folder first. Each stage has a
# time limit (STAGE_TIMEOUT_<stage>, seconds) so that one slow stage cannot eat the others.
set -uo pipefail
OUTDIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR [env install tests gputests sweep bench bench-methods bench-lm]}
shift
STAGES=${*:-env install tests gputests sweep bench bench-methods bench-lm}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/kdkernels-site .whl/*.whl && export PYTHONPATH=/tmp/kdkernels-site
fi

limit() { local name=${1//-/_}; local var="STAGE_TIMEOUT_$name"; echo "${!var:-$2}"; }
stage() {  # stage NAME DEFAULT_TIMEOUT COMMAND...: runs it, logs to OUTDIR/NAME.log, reports
    local name=$1 seconds; seconds=$(limit "$1" "$2"); shift 2
    local started=$SECONDS
    echo "== $name (limit ${seconds}s): $*"
    timeout --kill-after=10 "$seconds" "$@" > "$OUTDIR/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - started))s"
    tail -n "${TAIL_LINES:-15}" "$OUTDIR/$name.log"
    echo "$name $rc $((SECONDS - started))" >> "$OUTDIR/stages.txt"
}

for s in $STAGES; do
    case $s in
    env) stage env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton, sys; print(sys.version); \
print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name(), \
torch.cuda.get_device_properties(0))'; lscpu | grep -E 'Model name|Flags' | cut -c1-300" ;;
    install) stage install 300 bash -c "$PY -m pip install --no-build-isolation --no-deps -e . && \
$PY -c 'import kdkernels; print(kdkernels.backends())'" ;;
    tests) stage tests 420 $PY -m pytest -q -n "${WORKERS:-8}" -p no:cacheprovider tests \
        --ignore tests/test_gpu.py --durations 10 ;;
    gputests) stage gputests 300 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        --durations 10 ;;
    sweep) stage sweep 300 $PY -m benchmarks.gpu_sweep --out "$OUTDIR" ;;
    bench) TAIL_LINES=40 stage bench 540 $PY -m benchmarks.run --device cuda --methods kd \
        --out "$OUTDIR" --write-results ;;
    bench-methods) TAIL_LINES=30 stage bench-methods 540 $PY -m benchmarks.run --device cuda \
        --methods lessons_swap_dtd,teacher_bias,tfkd_reg --dtypes bf16 \
        --shapes 1024x1000,4096x32000,8192x128256 --out "$OUTDIR" \
        --write-results "{device}: other methods, bf16" ;;
    bench-lm) TAIL_LINES=40 stage bench-lm 540 $PY -m benchmarks.lm --device cuda --dtypes bf16 \
        --divergence "${LM_DIVERGENCE:-jsd}" --out "$OUTDIR" --write-results ;;
    overhead) stage overhead 180 $PY -m benchmarks.overhead --device cuda ;;
    # vocab-parallel on the Triton shard kernels: one nccl rank, shard time against the
    # single-device kernel on the same shard (goal: within 1.3x)
    vocab-parallel) TAIL_LINES=20 stage vocab-parallel 240 $PY -m benchmarks.vocab_parallel \
        --device cuda --world 1 --rows 4096 --vocab 32000 --out "$OUTDIR" ;;
    # the short loan's stage (about 8 minutes): CUDA graphs and host syncs, the bf16 forward's
    # fraction of a copy at the LM shape, the vision shapes against torch.compile, the shard
    # kernels' time against the single-device kernel
    fast) stage fast-gputests 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py \
            -k "graph or sync or small_rows" --durations 5
        stage fast-sweep 150 $PY -m benchmarks.gpu_sweep --shapes 8192x128256 --dtypes bf16 \
            --out "$OUTDIR"
        TAIL_LINES=30 stage fast-vision 240 $PY -m benchmarks.run --device cuda --methods kd \
            --shapes 256x100,1024x1000 --dtypes fp32,bf16 --out "$OUTDIR" \
            --write-results "{device}: vision shapes"
        TAIL_LINES=20 stage fast-vocab-parallel 180 $PY -m benchmarks.vocab_parallel \
            --device cuda --world 1 --rows 4096 --vocab 32000 --out "$OUTDIR" ;;
    *) echo "unknown stage $s"; exit 2 ;;
    esac
done
cp -f benchmarks/RESULTS.md "$OUTDIR/" 2>/dev/null || true
echo "== stages (name exit seconds):"; cat "$OUTDIR/stages.txt"
