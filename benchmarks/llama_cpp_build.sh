#!/usr/bin/env bash
# Build the llama.cpp client once, in a cache outside the repo (`make llama-cpp`; ~30+ min on 2 cores):
#   - llama.cpp's own sources from the llama-cpp-python sdist (it vendors llama.cpp with convert_hf_to_gguf.py and gguf-py),
#   - the C++ tools llama-quantize and llama-perplexity (CPU only, shared libllama),
#   - transact-llama-logits (benchmarks/llama_logits.cpp, compiled against that libllama),
#   - a virtualenv for the converter under its own pinned requirements (torch pinned to the CPU 2.13.0, see below).
# Usage: benchmarks/llama_cpp_build.sh [CACHE_DIR]   (default $TRANSACT_PL_CACHE or ~/.cache/transact_pl, + /clients/llama.cpp)
# Re-running skips every step that is already done.
set -euo pipefail

VERSION=0.3.36
ROOT=${1:-${TRANSACT_PL_CACHE:-$HOME/.cache/transact_pl}/clients/llama.cpp}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$ROOT/build

mkdir -p "$ROOT"
if [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
    echo "llama.cpp: downloading the llama-cpp-python $VERSION sdist (llama.cpp sources)"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ROOT/sdist"
    tar xzf "$ROOT/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
fi
ln -sfn "$SRC" "$ROOT/src"  # the stable path transact_pl/infra/gguf.py looks for

if [ ! -x "$BUILD/bin/llama-quantize" ] || [ ! -x "$BUILD/bin/llama-perplexity" ]; then
    echo "llama.cpp: building llama-quantize and llama-perplexity (CPU, -j$JOBS; ~30+ min on 2 cores)"
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >/dev/null
    nice -n 19 cmake --build "$BUILD" -j"$JOBS" --target llama-quantize llama-perplexity
fi

LOGITS=$ROOT/bin/transact-llama-logits
if [ ! -x "$LOGITS" ] || [ "$HERE/llama_logits.cpp" -nt "$LOGITS" ]; then
    echo "llama.cpp: compiling transact-llama-logits"
    mkdir -p "$ROOT/bin"
    nice -n 19 g++ -O2 -std=c++17 "$HERE/llama_logits.cpp" -o "$LOGITS" -I"$SRC/include" -I"$SRC/ggml/include" \
        -L"$BUILD/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$BUILD/bin"
fi

# The converter's own pins (requirements/requirements-convert_hf_to_gguf.txt) with one change: torch==2.13.0 instead of
# its torch==2.11.0 from the PyTorch CPU index, which this machine does not reach (PyPI's 2.11.0 is a multi-GB CUDA
# build); 2.13.0 is the CPU wheel on this machine's disk. The converter only uses torch to read tensors.
VENV=$ROOT/venv
if ! "$VENV/bin/python" -c "import transformers, gguf, torch" 2>/dev/null; then
    echo "llama.cpp: converter virtualenv (transformers and numpy as pinned by llama.cpp, torch 2.13.0 CPU)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    grep -v -e '^torch' -e '^--extra-index-url' -e '^-r' "$SRC/requirements/requirements-convert_hf_to_gguf.txt" \
        >"$ROOT/requirements-convert.txt"
    grep -v '^-r' "$SRC/requirements/requirements-convert_legacy_llama.txt" >>"$ROOT/requirements-convert.txt"
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-convert.txt"
fi
echo "llama.cpp: ready in $ROOT"
