#!/usr/bin/env bash
# Install teleread and run the whole path once on the embedded defaults (SQLite + local objects).
set -euo pipefail
cd "$(dirname "$0")/.."
# The hub renders the printed reports with a Chinese font it embeds: Debian's fonts-wqy-zenhei.
if [ ! -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends fonts-wqy-zenhei >/dev/null
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e .
bash scripts/viewer.sh  # the reading station's image viewer (npm, locked)
exec .venv/bin/teleread demo "$@"
