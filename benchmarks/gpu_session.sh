#!/usr/bin/env bash
# The GPU checks of benchmarks/README.md ("On a GPU machine") as one prepared device call.
#
#   bash benchmarks/gpu_session.sh fetch   # here: wheels the device image lacks -> .whl/ (git-ignored)
#   bash benchmarks/gpu_session.sh run     # there, with .whl carried: install, build, test, measure
#
# The device image (Python 3.12, torch, triton, cupy, nvcc, scikit-build-core, pybind11, pytest,
# pytest-benchmark, scipy, matplotlib, safetensors, scikit-learn, tqdm) lacks only mnist1d, whose
# own requirements it has.  `fetch` also copies this machine's sharpkit cache (the MNIST-1D files and
# the trained benchmark MLP) into .whl/cache, so the device trains nothing.  `run` writes everything
# under $OUT: the build and test logs, the JSON files and the printed tables, each step bounded so
# that the whole call stays under the device's 600 s per command and one hang leaves time for the rest.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "mnist1d==0.0.2.post1"
    # The benchmark's trained model: run `python benchmarks/bench_sharpness.py --skip-memory` once first.
    cache=$(python3 -c 'import os; print(os.environ.get("SHARPKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sharpkit"))')
    mkdir -p .whl/cache
    cp "$cache"/mnist1d-*.npz "$cache"/bench_sharpness_f1_b400_e200_s0.pt .whl/cache/ || exit 1
    du -sh .whl
    ;;
run)
    : "${OUT:?run needs OUT, the device call output folder}"
    export PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" | tee "$OUT/FAILED"; exit 1; }
    export PYTHONPATH=/tmp/site SHARPKIT_CACHE="$PWD/.whl/cache"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.csv" 2>&1
    { date -u; git rev-parse --short HEAD 2>/dev/null || echo "(no git metadata)"; python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'; } > "$OUT/env.txt" 2>&1
    # Each step gets its own bound, cut to what is left before DEADLINE seconds into the call (the
    # device's 600 s per command, less a margin for sending $OUT back): the kernels' own GPU tests
    # come first, then the figures of the open issues, then every other GPU-marked test with the rest.
    DEADLINE=570
    bound() { local left=$((DEADLINE - SECONDS)); echo $(( left < $1 ? (left > 5 ? left : 5) : $1 )); }
    timeout "$(bound 150)" python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
        || { echo "build failed" | tee "$OUT/FAILED"; tail -40 "$OUT/build.log"; exit 1; }
    echo "built at ${SECONDS} s" >> "$OUT/env.txt"
    timeout "$(bound 20)" python3 -m sharpkit backends > "$OUT/backends.txt" 2>&1
    kernel_tests=(tests/test_ce_hvp.py tests/test_saturated_softmax.py tests/test_ops_subspace.py
                  tests/test_fused.py tests/test_fused_activations.py tests/test_philox.py)
    timeout "$(bound 100)" python3 -m pytest -m gpu "${kernel_tests[@]}" -v -p no:cacheprovider --durations=10 \
        > "$OUT/pytest_gpu_kernels.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_gpu_kernels.log"
    timeout "$(bound 90)" python3 benchmarks/gpu_fused.py --out "$OUT/gpu_fused.json" > "$OUT/gpu_fused.txt" 2>&1
    timeout "$(bound 70)" python3 benchmarks/bench_audit.py --device cuda --counts 16 64 --repeats 2 > "$OUT/audit_cuda.txt" 2>&1
    timeout "$(bound 60)" python3 benchmarks/gpu_ops.py --out "$OUT" > "$OUT/gpu_ops.txt" 2>&1
    timeout "$(bound 70)" python3 benchmarks/bench_sharpness.py --device cuda --skip-memory --rounds 3 > "$OUT/sharpness_cuda.txt" 2>&1
    deselect=(); for t in "${kernel_tests[@]}"; do deselect+=(--ignore "$t"); done
    timeout "$(bound 400)" python3 -m pytest -m gpu tests "${deselect[@]}" -q -rfE -p no:cacheprovider --durations=10 \
        > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$? at ${SECONDS} s" >> "$OUT/pytest_gpu.log"
    tail -3 "$OUT"/pytest_gpu_kernels.log "$OUT"/gpu_fused.txt "$OUT"/audit_cuda.txt "$OUT"/gpu_ops.txt \
        "$OUT"/sharpness_cuda.txt "$OUT"/pytest_gpu.log
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh fetch|run" >&2
    exit 2
    ;;
esac
