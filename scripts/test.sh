#!/usr/bin/env bash
# Run the whole test suite: sets the machine up (scripts/setup.sh), then pytest. GUI tests run
# under a virtual X server started by pytest-xvfb (Xvfb is installed by setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QT_API=pyqt6 PYTHONUNBUFFERED=1
# 2 cores in CI: keep torch from oversubscribing.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest "$@"
