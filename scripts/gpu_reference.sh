#!/usr/bin/env bash
# The GPU reference runs, on a CUDA machine where model-workbench is importable (the repo root on
# PYTHONPATH or installed): the GPU tests, then recipes/minilm-l6-gpu.yaml and
# recipes/minilm-l6-gpu-distill.yaml. Each stage leaves its log, and each run its report folder
# (results, report, plots, run.log; not the model files), packed in OUT_DIR as soon as it ends, so
# a session cut short still keeps what finished.
#
#   bash scripts/gpu_reference.sh OUT_DIR [tests] [gpu] [distill]     (default: all three)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: gpu_reference.sh OUT_DIR [tests] [gpu] [distill]}
shift
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
RUNS=${RUNS:-/tmp/workbench-gpu-runs}
STAGES=${*:-tests gpu distill}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

for stage in $STAGES; do
    start=$(date +%s)
    case $stage in
        tests)
            $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT_DIR/test_gpu.log" | tail -n 30 ;;
        gpu|distill)
            recipe=recipes/minilm-l6-gpu.yaml
            [ "$stage" = distill ] && recipe=recipes/minilm-l6-gpu-distill.yaml
            name=$(basename "$recipe" .yaml)
            # Straight to the file, no pipe: a stage killed by a time limit keeps every line it wrote
            # (a pipe's buffer dies with it; that lost the first GPU run's log).
            $PY -m workbench.cli run "$recipe" --out "$RUNS" > "$OUT_DIR/$stage.log" 2>&1
            echo "$stage: exit $?"
            run=$(ls -td "$RUNS/$name"/*/ 2>/dev/null | grep -v /cache/ | head -n 1)
            [ -n "$run" ] && tar czf "$OUT_DIR/$stage-run.tar.gz" -C "$run" --exclude=variants --exclude=.work . ;;
        *)
            echo "unknown stage $stage (tests, gpu, distill)"; exit 2 ;;
    esac
    echo "stage $stage took $(( $(date +%s) - start )) s"
done
