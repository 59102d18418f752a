#!/usr/bin/env bash
# llama.cpp for the `llama-cpp` backend and the `gguf-quantize` step / `gguf` format:
#  - llama-cpp-python, which pip compiles from source on a CPU machine (8-12 minutes on 2 cores, once:
#    pip's wheel cache keeps the result), with sentencepiece for SentencePiece vocabularies;
#  - llama.cpp's own converter (convert_hf_to_gguf.py, its `conversion` package and gguf-py), unpacked
#    from the very same llama-cpp-python source release into $VENV/share/llama.cpp, so the converter
#    and the engine that loads its files are one version of llama.cpp.
# `make demo` does not need it (the quickstart recipe uses no llama.cpp); `make test` runs this first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
PIP="$VENV/bin/python -m pip"
DEST="$VENV/share/llama.cpp"

"$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '$VERSION' else 1)" 2>/dev/null \
    || { echo "building llama-cpp-python $VERSION from source (8-12 minutes on 2 cores, once)"; \
         $PIP install -q "llama-cpp-python==$VERSION"; }
$PIP install -q "sentencepiece>=0.2"

if [ ! -f "$DEST/VERSION" ] || [ "$(cat "$DEST/VERSION")" != "$VERSION" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    $PIP download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$tmp"
    tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" --wildcards \
        "*/vendor/llama.cpp/convert_hf_to_gguf.py" "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*"
    rm -rf "$DEST.new" && mkdir -p "$DEST.new"
    cp -r "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp/." "$DEST.new/"
    echo "$VERSION" > "$DEST.new/VERSION"
    rm -rf "$DEST" && mv "$DEST.new" "$DEST"  # whole or not at all
fi
"$VENV/bin/python" -c "import llama_cpp; print('llama.cpp ready: llama-cpp-python', llama_cpp.__version__, '| converter in $DEST')"
