#!/usr/bin/env bash
# Quick start: train on the built-in synthetic categories as a local Ray Train job.
# Extra arguments are passed to `cape-ray train` (e.g. --epochs 5 --num_workers 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cape-ray train "$@"
