#!/usr/bin/env bash
# Create .venv (once) and install cape-ray with its pinned requirements, runtime and test
# (requirements-test.txt includes requirements.txt). Idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The pinned numpy, pillow, matplotlib and pyarrow need Python 3.11 or newer.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup.sh: cape-ray needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1): run PYTHON=python3.11 bash scripts/setup.sh" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  # Debian and Ubuntu ship venv (and the pip it bootstraps) separately: check before making a .venv
  # that would lack pip.
  "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || {
    version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "setup.sh: $PYTHON cannot create a virtual environment (no ensurepip): install it, e.g. 'sudo apt install python$version-venv', then rerun" >&2
    exit 1
  }
  "$PYTHON" -m venv .venv || { rm -rf .venv; echo "setup.sh: '$PYTHON -m venv .venv' failed (see above); .venv removed" >&2; exit 1; }
fi
stamp=.venv/.cape-ray-installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ requirements-test.txt -nt "$stamp" ] \
   || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing cape-ray and its requirements into .venv ..." >&2
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
  .venv/bin/python -m pip install --quiet -r requirements-test.txt
  .venv/bin/python -m pip install --quiet --no-deps -e .
  touch "$stamp"
fi
