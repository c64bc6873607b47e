#!/usr/bin/env bash
# The test command: install everything needed (idempotent), then run the whole suite on the CPU.
# GPU tests are marked `gpu` and skip themselves without CUDA (run them on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install
python3 -m pytest -q tests "$@"
