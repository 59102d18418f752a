#!/usr/bin/env bash
# The GPU checks and reference runs. On a CUDA machine where model-workbench and its dependencies are
# installed:  GPU_KIT=none bash scripts/gpu_driver.sh  (logs and run folders land in GPU_OUT, default
# /tmp/gpuout). On a bare offline one, scripts/gpu_kit_device.sh's first call starts it in the
# background (from a copy of the repo in /tmp/repo): each stage waits for the parts of the kit it
# needs, runs under its own time limit, and leaves its log (and run folder, without model files, with
# the journal of measured processes) in GPU_OUT as soon as it ends, so a session cut short keeps
# what finished. Stages, in the order the kit's files arrive:
#   env      the GPU, torch, CPU flags                                    (needs nothing)
#   tests    tests/test_gpu.py but its causal-LM test: torch.compile, the digits CNN's precisions,
#            nf4 and distillation on CUDA (its ORT cell says why where onnxruntime-gpu is not there
#            yet)                                                         (needs the wheels)
#   lmtest   tests/test_gpu.py's causal-LM generation on torch-cuda and ort-cuda (needs onnxruntime-gpu)
#   grid     recipes/minilm-l6-gpu.yaml, the precision grid               (needs the MiniLM weights)
#   lm       recipes/docstring-gpt-gpu.yaml --quick, decode on CUDA against the CPU
#   distill  recipes/minilm-l6-gpu-distill.yaml (not in the default STAGES)
# STAGES picks them (default "tests lmtest grid lm"); limits in seconds: TESTS_S, LMTEST_S, GRID_S,
# LM_S, DISTILL_S. Seen on an H200 (2026-12-04, torch 2.11): tests 264 s, lmtest 97 s; a measured
# process costs about 17 s there (a fresh process imports torch and transformers and starts CUDA), so the
# grid's 18 processes and its 50 s of building need about 6.5 minutes. Everything together does not
# fit a 15-minute lease beside the transfers (84 s): pick, e.g. STAGES="grid lm".
set -u
O=${GPU_OUT:-/tmp/gpuout}; K=${GPU_KIT:-/tmp/kit}; RUNS=/tmp/workbench-gpu-runs
cd "$(dirname "$0")/.."
mkdir -p "$O" "$RUNS"
export PYTHONPATH=${GPU_SITE:-/tmp/site}:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       WORKBENCH_CACHE=${WORKBENCH_CACHE:-/tmp/wbcache}
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
wait_for() { [ -d "$K" ] || return 0; say "waiting for $1"; while [ ! -e "$K/$1.ready" ]; do sleep 2; done; say "$1 ready"; }
pack() {  # run folder of the newest run of recipe $1 -> $O/$2-run.tar.gz (with the journal of measured
          # processes, so a run stopped by its limit still brings back what it measured)
    local run; run=$(ls -td "$RUNS/$1"/*/ 2>/dev/null | grep -v /cache/ | head -n 1)
    [ -n "$run" ] || return 0
    (cd "$run" && { find . \( -path ./variants -o -path ./.work \) -prune -o -print; ls ./.work/processes.jsonl 2>/dev/null; } \
        | tar czf "$O/$2-run.tar.gz" --no-recursion -T -) && say "packed $run"
}
STAGES=${STAGES:-tests lmtest grid lm}
want() { case " $STAGES " in *" $1 "*) return 0;; esac; say "$1: not in STAGES"; return 1; }
stage_done() { say "$1: exit $2"; touch "$O/$1.done"; }  # what `gpu_kit_device.sh collect S STAGE` waits for
pytest_stage() {  # STAGE LIMIT_S -k EXPRESSION: tests/test_gpu.py's tests that match, log in $O/STAGE.log
    want "$1" || return 0
    say "$1: start"
    timeout "$2" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "$3" > "$O/$1.log" 2>&1
    stage_done "$1" $?; tail -n 3 "$O/$1.log"
}
recipe_stage() {  # STAGE LIMIT_S RECIPE [run options]: a recipe's run, its log in $O/STAGE.log, its folder packed
    want "$1" || return 0
    local stage=$1 limit=$2 recipe=$3; shift 3
    say "$stage: start"
    timeout "$limit" $PY -m workbench.cli run "recipes/$recipe.yaml" --out "$RUNS" "$@" > "$O/$stage.log" 2>&1
    stage_done "$stage" $?; pack "$recipe" "$stage"
}

{ nvidia-smi; $PY -V; $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  grep -m1 'model name' /proc/cpuinfo; nproc; grep -o -E 'avx512_vnni|avx512_bf16|amx_tile|avx2' /proc/cpuinfo | sort | uniq -c
  free -g | head -2; df -h /tmp | tail -1; } > "$O/env.txt" 2>&1
say "env:"; cat "$O/env.txt"

wait_for wheels
$PY -c "import transformers, bitsandbytes, pydantic, numpy, onnx; print('transformers', transformers.__version__, 'bnb', bitsandbytes.__version__, 'numpy', numpy.__version__, 'onnx', onnx.__version__)" 2>&1 | tee -a "$O/env.txt"
pytest_stage tests "${TESTS_S:-360}" "not causal"

wait_for ort
$PY -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())" 2>&1 | tee -a "$O/env.txt"
pytest_stage lmtest "${LMTEST_S:-150}" causal

wait_for minilm
recipe_stage grid "${GRID_S:-480}" minilm-l6-gpu
recipe_stage lm "${LM_S:-150}" docstring-gpt-gpu --quick
recipe_stage distill "${DISTILL_S:-300}" minilm-l6-gpu-distill
touch "$O/done"; say "done"
