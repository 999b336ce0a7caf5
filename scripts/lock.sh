#!/usr/bin/env bash
# Regenerate requirements/lock.txt: resolve this package with its test extras from today's
# registry in a clean, throw-away virtual environment (torch==2.13.0 first, as everywhere), check
# it (pip check, every declared dependency imports), and write what pip picked as constraints.
#   bash scripts/lock.sh          # then run bash scripts/test.sh and commit requirements/lock.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
V="$tmp/venv/bin/python"
"$V" -m pip install -q --upgrade pip
"$V" -m pip install -q "torch==2.13.0"
"$V" -m pip install -q ".[testing]"
"$V" -m pip check
"$V" scripts/check_install.py
{
  echo "# Constraints for scripts/setup.sh: what pip resolved for napari-genselfdiff[testing] in a clean"
  echo "# virtual environment on $(date -u +%Y-%m-%d) (Python $("$V" -c 'import platform; print(platform.python_version())'), $(uname -m))."
  echo "# Regenerate with: bash scripts/lock.sh   (torch is installed first, separately: see README)"
  "$V" -m pip freeze --exclude-editable | grep -iv '^napari-genselfdiff' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "lock: wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
