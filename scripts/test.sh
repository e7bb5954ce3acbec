#!/usr/bin/env bash
# Set up and run the test suite (no GPU or PyTorch needed; GPU tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q tests "$@"
