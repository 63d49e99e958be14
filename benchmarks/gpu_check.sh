#!/usr/bin/env bash
# The one-shot GPU check (shared/gpu.md), run on the GPU machine:
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# 1 build + install for sm_90   2 fastmlp.backends()   3 pytest -m gpu (includes
#   every GEMM family kernel: tests/test_gemm_cuda.py; the CUDA Graph engine against
#   the CUDA executor: tests/test_engine_gpu.py)   4 compute-sanitizer
#   memcheck / racecheck / synccheck / initcheck on a small GPU subset (incl. one
#   run of each GEMM family kernel)   5 benchmarks/tune_gemm.py: check and time
#   every GEMM family kernel on every benchmark shape, write the GPU's tuning
#   table   6 benchmarks/run.py --quick --device cuda with that table (GEMM vs
#   cuBLAS and PyTorch, TF32 vs cuBLAS TF32, fused Dense ops, memory-bound
#   kernels, issue 15's layers (activations, dropout, batch/layer norm vs
#   PyTorch CUDA; fused Dense + activation vs unfused; last, so --budget-s
#   skips it first), training vs PyTorch; Fashion-MNIST epochs at batch 32/128/1024 and
#   10 epochs to test accuracy from host arrays, vs PyTorch eager and PyTorch
#   CUDA Graphs, with the training-engine issue's H200 targets: --quick keeps
#   that section to 3 epochs / 2 jobs each, estimated 30-60 s; its PyTorch
#   eager runs dominate)   7 summary table (printed last).
# Every step has a timeout, and all of them share one budget (CHECK_BUDGET_S,
# default 540 s) so the whole check stays under ~9 minutes; the tuning and the
# benchmark keep a reserve the earlier steps cannot eat. A failed build skips
# the rest; any other failure is reported and the next steps still run (each
# step's log tail is printed as it ends).
# Exit status: 0 only if every step passed.
#
# OUTDIR gets at most 8 files, 1 folder deep: check.log (build, backends,
# tests, sanitizer), bench.log (tuning + benchmark output), summary.md,
# gemm_tuning.json (the packaged table with this GPU's block: copy it to
# python/fastmlp/gemm_tuning.json and commit it), tune_report.md, and bench/
# with results.json results.md plots.png (copy bench/ and tune_report.md to
# benchmarks/results/h200/ to commit them).
#
# Knobs (environment): CHECK_BUDGET_S; TUNE_BUDGET_S (tune_gemm.py's own budget,
# default 100); SANITIZE_TESTS (pytest paths, default tests/test_ops.py
# tests/test_gemm_cuda.py); SANITIZE_K (pytest -k for memcheck, default
# "small or sanitize"); SANITIZE_K_SHARED (-k for racecheck/synccheck/initcheck).
set -uo pipefail
# Here every GPU test must run: conftest turns "CUDA not usable" skips into failures.
export FASTMLP_REQUIRE_GPU=1
# The GPU training tests and run.py's epoch section read Fashion-MNIST (without it that
# section is skipped, said in results.md). The GPU machine cannot install Debian's
# dataset-fashion-mnist, so the caller carries the four files in the ignored folder
# .data/fashion-mnist (mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/,
# then run with carry [".data"]); without them those tests fail, saying where they looked.
if [[ -d "$(dirname "${BASH_SOURCE[0]}")/../.data" && -z ${FASTMLP_DATA:-} ]]; then
    FASTMLP_DATA=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.data" && pwd)
    export FASTMLP_DATA
fi

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

BUDGET=${CHECK_BUDGET_S:-540}
TUNE_BUDGET_S=${TUNE_BUDGET_S:-100}
SANITIZE_TESTS=${SANITIZE_TESTS:-tests/test_ops.py tests/test_gemm_cuda.py tests/test_engine_gpu.py tests/test_layers.py}
SANITIZE_K=${SANITIZE_K:-small or sanitize}
# racecheck/synccheck/initcheck are slower; they get the kernels with shared
# memory, barriers or reductions (GEMM edge tiles, bias_grad, softmax-CE, one
# run of every GEMM family kernel: cp.async pipelines, split-K; a small run of the
# CUDA Graph engine: gather, fused softmax-CE, optimizer table, captured graphs; every
# issue-15 kernel once: activations, dropout, the activation GEMM epilogue, the
# BatchNorm / LayerNorm strip and warp reductions).
SANITIZE_K_SHARED=${SANITIZE_K_SHARED:-(small and (63x65x64 or 65x63x65 or bias_grad or softmax_cross_entropy)) or sanitize_family or sanitize_engine or sanitize_layers}
LOG=$OUT/check.log

declare -a SUMMARY=()
FAILED=0
RESERVE=0   # seconds of the budget kept back for the steps after the current one

# run_step NAME CAP_SECONDS LOGFILE CMD...: runs CMD with a timeout of
# min(CAP, budget left - RESERVE), appending its output to LOGFILE, and
# records the row.
run_step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((BUDGET - SECONDS - RESERVE))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        SUMMARY+=("| $name | SKIP | 0 | no time left in the ${BUDGET} s budget |")
        FAILED=1
        return 1
    fi
    echo "== $name (timeout ${limit}s)" | tee -a "$log"
    local t0=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local dt=$((SECONDS - t0)) status note=""
    if ((rc == 0)); then
        status=PASS
    elif ((rc == 124 || rc == 137)); then
        status=TIMEOUT; note="killed after ${limit} s"
    else
        status=FAIL; note="exit $rc"
    fi
    # pytest's 5 means no test was selected: a check that ran nothing failed.
    if ((rc == 5)) && [[ $name == pytest* || $name == sanitize* ]]; then
        note="exit 5: no tests selected"
    fi
    [[ $status == PASS ]] || FAILED=1
    SUMMARY+=("| $name | $status | $dt | $note (log: $(basename "$log")) |")
    # This step's last lines, so a failure is visible here even if a later step fails too.
    tail -n 6 "$log" | grep -v '^== ' | sed "s/^/   [$name] /"
    echo "== $name: $status in ${dt}s $note" | tee -a "$log"
    [[ $status == PASS ]]
}

print_summary() {
    {
        echo
        echo "## gpu_check summary ($(date -u +%FT%TZ), ${SECONDS} s total)"
        echo
        echo "| step | status | seconds | note |"
        echo "|---|---|---|---|"
        printf '%s\n' "${SUMMARY[@]}"
        echo
        if ((FAILED)); then echo "RESULT: FAIL"; else echo "RESULT: PASS"; fi
    } | tee "$OUT/summary.md"
}

# ---- 1. build and install for sm_90 -------------------------------------------
# CMake reads the architectures from CUDAARCHS (environment) or the
# CMAKE_CUDA_ARCHITECTURES cache variable (scikit-build-core passes CMAKE_ARGS);
# the bare CMAKE_CUDA_ARCHITECTURES variable is set too, as the project's docs
# name it. --no-index: that machine has no network, so never try to reach one.
# PIP_BREAK_SYSTEM_PACKAGES: an externally managed system Python would otherwise
# refuse the install (nothing else can be installed there anyway).
{
    echo "# $(date -u +%FT%TZ) on $(hostname)"
    nvidia-smi -L 2>&1
    nvcc --version 2>&1 | tail -2
    python3 --version 2>&1
} >"$LOG"
if ! run_step "build+install (sm_90)" 240 "$LOG" \
    env CMAKE_CUDA_ARCHITECTURES=90 CUDAARCHS=90 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
    FASTMLP_CUDA=ON PIP_BREAK_SYSTEM_PACKAGES=1 \
    python3 -m pip install --no-index --no-build-isolation --no-deps -v .; then
    tail -n 40 "$LOG"
    for s in "fastmlp.backends()" "pytest -m gpu" "sanitize" "tune_gemm" "benchmarks"; do
        SUMMARY+=("| $s | SKIP | 0 | build failed |")
    done
    print_summary
    exit 1
fi

# ---- 2. the backends the installed package sees ---------------------------------
# Run outside the repo so the installed package, not ./python, is imported.
run_step "fastmlp.backends()" 60 "$LOG" \
    bash -c 'cd /tmp && python3 -c "import fastmlp; b = fastmlp.backends(); print(b); assert b.get(\"cuda\"), \"CUDA backend not usable\""'

# ---- 3. the GPU tests ------------------------------------------------------------
# The tuning and the benchmark keep their share of the budget.
RESERVE=$((TUNE_BUDGET_S + 30 + 150))
# The core first (ops, engines, training), then the rest: if the step runs out of
# time, what it cut is the long tail of op-shape twins, not the training path.
GPU_TESTS=(tests/test_ops.py tests/test_engine_gpu.py tests/test_train_gpu.py tests/test_gpu.py
           tests/test_fused.py tests/test_layers.py tests/test_privacy.py tests/test_explain.py
           tests/test_adversarial.py tests/test_distributed.py tests/test_gemm_cuda.py)
for f in tests/test_*.py; do
    [[ " ${GPU_TESTS[*]} " == *" $f "* ]] || GPU_TESTS+=("$f")
done
run_step "pytest -m gpu" 170 "$LOG" python3 -m pytest -m gpu -q "${GPU_TESTS[@]}"

# ---- 4. compute-sanitizer over a small GPU subset -----------------------------------
# CuPy's memory pool carves many arrays out of one cudaMalloc, which hides
# out-of-bounds accesses from memcheck; pytest is therefore started in-process
# after cupy.cuda.set_allocator(None), so every array is its own allocation.
SAN=$(command -v compute-sanitizer || true)
for cand in "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/x)")/compute-sanitizer" \
            /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -z $SAN && -x $cand ]] && SAN=$cand
done
PYTEST_NO_POOL='import sys, cupy, pytest; cupy.cuda.set_allocator(None); sys.exit(pytest.main(sys.argv[1:]))'
for tool in memcheck racecheck synccheck initcheck; do
    if [[ -z $SAN ]]; then
        echo "compute-sanitizer not found (PATH, next to nvcc, /usr/local/cuda)" >>"$LOG"
        SUMMARY+=("| sanitize $tool | FAIL | 0 | compute-sanitizer not found |")
        FAILED=1
        continue
    fi
    case $tool in memcheck) cap=80; sel=$SANITIZE_K ;; racecheck) cap=60; sel=$SANITIZE_K_SHARED ;;
                  *) cap=35; sel=$SANITIZE_K_SHARED ;; esac
    # shellcheck disable=SC2086
    run_step "sanitize $tool" $cap "$LOG" \
        "$SAN" --tool "$tool" --error-exitcode 1 \
        python3 -c "$PYTEST_NO_POOL" -m gpu -q -x -p no:cacheprovider $SANITIZE_TESTS -k "$sel"
done

# ---- 5. GEMM tuning ---------------------------------------------------------------------------
# Checks every GEMM family kernel on every benchmark shape against float64, times
# the ones that pass, and writes the table with this GPU's verified winners.
RESERVE=150
: >"$OUT/bench.log"
run_step "tune_gemm (budget ${TUNE_BUDGET_S}s)" $((TUNE_BUDGET_S + 30)) "$OUT/bench.log" \
    python3 benchmarks/tune_gemm.py --out "$OUT" --budget-s "$TUNE_BUDGET_S"
# The benchmark runs with the new table where there is one (else the packaged one).
TABLE_ENV=()
if [[ -s $OUT/gemm_tuning.json ]]; then
    TABLE_ENV=(env "FASTMLP_GEMM_TABLE=$OUT/gemm_tuning.json")
fi

# ---- 6. benchmarks ------------------------------------------------------------------------
# run.py exits 2 when it sees no usable GPU and 1 when an output fails its check.
RESERVE=0
# The training-engine rows (epoch: fastmlp's CUDA Graph engine vs PyTorch eager and
# PyTorch CUDA Graphs, time to accuracy) come first; --budget-s stops starting
# sections ~45 s before this step's timeout, so the results so far are written.
BENCH_LEFT=$((BUDGET - SECONDS))
BENCH_CAP=$((BENCH_LEFT < 240 ? BENCH_LEFT : 240))
run_step "benchmarks (run.py --quick)" 240 "$OUT/bench.log" \
    "${TABLE_ENV[@]}" python3 benchmarks/run.py --quick --device cuda --out "$OUT/bench" \
    --sections epoch,training,gemm,memory,layers,losses,privacy,robustness --budget-s $((BENCH_CAP > 90 ? BENCH_CAP - 45 : 45))
cat "$OUT/bench/results.md" 2>/dev/null

# ---- 7. summary -------------------------------------------------------------------------
print_summary
exit $FAILED
