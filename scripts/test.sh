#!/usr/bin/env bash
# Run the whole test suite: sets the machine up (scripts/setup.sh, from the lock), then pytest.
# `bash scripts/test.sh --latest [pytest args]` runs it in .venv-latest, resolved without the lock. GUI tests run
# under a virtual X server started by pytest-xvfb (Xvfb is installed by setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if [ "${1:-}" = "--latest" ]; then   # the suite against today's registry, without the lock
  shift
  VENV=.venv-latest
  bash scripts/setup.sh --latest
else
  bash scripts/setup.sh
fi
export QT_API=pyqt6 PYTHONUNBUFFERED=1
# 2 cores in CI: keep torch from oversubscribing.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$VENV/bin/python" -m pytest "$@"
