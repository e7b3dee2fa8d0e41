#!/usr/bin/env bash
# The whole GPU check in one call (about 5 minutes on one GPU): the GPU tests, the kernel
# benchmark and the training-step benchmark at Llama-7B shapes (a 2-layer slice).
#
#   benches/gpu_check.sh OUT_DIR [WHEEL]
#
# OUT_DIR receives env.txt, pytest_gpu.txt, bench_gpu.md/.json/.txt, train.md/.txt and
# summary.txt. WHEEL (optional) is a unilora_rs wheel built elsewhere, for a machine
# without a Rust toolchain:  maturin build --release --features abi3 -o .whl
# it is installed into a temporary folder that goes first on PYTHONPATH. Without it,
# the unilora_rs importable by $PYTHON (default python3) is used. Each step has its own
# time limit, so one hang cannot take the others' time; warnings are shown, not raised.
set -uo pipefail

out=${1:?usage: benches/gpu_check.sh OUT_DIR [WHEEL]}
wheel=${2:-}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if [ -n "$wheel" ]; then
    site=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" \
        || { echo "gpu_check: cannot install $wheel" | tee "$out/summary.txt"; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u
    nvidia-smi -L 2>&1
    "$PYTHON" -c "import torch, triton, unilora_rs as ur; print('torch', torch.__version__, \
'triton', triton.__version__, 'unilora_rs', ur.__version__, ur.__file__); \
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 30, 'GiB')"
    for m in numpy peft transformers hypothesis pytest; do
        "$PYTHON" -c "import $m; print('$m', $m.__version__)" 2>&1 | tail -1
    done
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

status=()
step() {  # step NAME SECONDS LOG CMD...: runs CMD with a time limit into LOG, records its exit
    local name=$1 limit=$2 log=$3
    shift 3
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    status+=("$name: exit $rc in $((SECONDS - t0)) s")
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
}

tests=(tests/test_triton_kernels.py tests/test_torch_kernels.py)
if ! "$PYTHON" -c "import hypothesis" 2>/dev/null; then
    echo "hypothesis is not installed: tests/test_torch_kernels.py is skipped"
    tests=(tests/test_triton_kernels.py)
fi
step "pytest -m gpu" 150 "$out/pytest_gpu.txt" "$PYTHON" -m pytest -m gpu "${tests[@]}" -q -rs \
    -W default -p no:cacheprovider
step "bench_gpu" 120 "$out/bench_gpu.txt" "$PYTHON" benches/bench_gpu.py \
    --out "$out/bench_gpu.md" --json "$out/bench_gpu.json"
step "bench_train" 150 "$out/train.txt" "$PYTHON" benches/bench_train.py --device cuda \
    --dtype bfloat16 --hidden 4096 --layers 2 --vocab 32000 --seq 512 --batch 4 --d 32768 \
    --warmup 3 --steps 10 --out "$out/train.md"

printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
