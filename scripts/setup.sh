#!/usr/bin/env bash
# Set up this checkout on a fresh machine: system packages for headless napari (Xvfb, Mesa, the
# xcb libraries Qt6 needs), a virtual environment in .venv with torch==2.13.0 installed FIRST
# (an unpinned torch pulls several GB of CUDA wheels), then this package with its test extras,
# every version taken from the committed lock (requirements/lock.txt; `bash scripts/lock.sh`
# regenerates it). Ends with `pip check` and an import of every declared dependency
# (scripts/check_install.py): one line naming what is broken, exit 2.
#   bash scripts/setup.sh            # .venv from the lock (the README's first command, CI)
#   bash scripts/setup.sh --latest   # .venv-latest, resolved afresh from today's registry, no lock:
#                                    # shows drift before it reaches a user (scripts/test.sh --latest)
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
LOCK=(-c requirements/lock.txt)
if [ "${1:-}" = "--latest" ]; then
  VENV=.venv-latest
  LOCK=()
  rm -rf .venv-latest   # resolved afresh every time: that is its point
elif [ -n "${1:-}" ]; then
  echo "setup: unknown option ${1} (use --latest or nothing)" >&2
  exit 2
fi

need_apt=()
command -v Xvfb >/dev/null 2>&1 || need_apt+=(xvfb xauth)
for lib in libxkbcommon-x11.so.0 libxcb-icccm.so.4 libxcb-cursor.so.0 libEGL.so.1 libfontconfig.so.1 libdbus-1.so.3; do
  ldconfig -p | grep -q "$lib" || { need_apt+=(libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libegl1 libfontconfig1 libgl1-mesa-dri); break; }
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install ${need_apt[*]} (GUI tests need Xvfb and Mesa)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build unless you installed your own)"
  "$VPY" -m pip install -q "torch==2.13.0"
fi
if ! "$VPY" -c "import napari_genselfdiff, pytest, pytestqt, napari, PyQt6" >/dev/null 2>&1 \
   || [ setup.cfg -nt "$VENV/.installed" ] || [ requirements/lock.txt -nt "$VENV/.installed" ]; then
  if [ ${#LOCK[@]} -gt 0 ]; then
    echo "setup: installing napari-genselfdiff and its dependencies into $VENV (versions from requirements/lock.txt)"
  else
    echo "setup: installing napari-genselfdiff and the newest dependencies the registry offers into $VENV (no lock)"
  fi
  "$VPY" -m pip install -q ${LOCK[@]+"${LOCK[@]}"} -e ".[testing]"
  touch "$VENV/.installed"
fi
if ! out=$("$VPY" -m pip check 2>&1); then
  echo "setup: $VENV is inconsistent (pip check): $(echo "$out" | head -1)" >&2
  exit 2
fi
if ! out=$("$VPY" scripts/check_install.py 2>&1); then
  echo "setup: $VENV is broken: ${out#install check: }" >&2
  exit 2
fi
"$VPY" -c "import torch, napari_genselfdiff; print('setup: ok ($VENV), torch', torch.__version__, '| napari-genselfdiff', napari_genselfdiff.__version__)"
