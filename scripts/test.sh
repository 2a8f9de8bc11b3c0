#!/usr/bin/env bash
# Run the test suite (fast unit tests and the real-Ray fault tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
