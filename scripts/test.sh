#!/usr/bin/env bash
# Install everything teleread's tests need on a fresh Debian machine, then run the whole suite.
# System packages (PostgreSQL, dcmtk, fonts-wqy-zenhei that the hub sets the PDF report in,
# poppler-utils to rasterise the PDF in tests, chromium for the reading station's browser tests)
# come from Debian;
# Python packages into .venv (Playwright drives Debian's chromium: it never downloads a browser).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
[ -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || need+=(fonts-wqy-zenhei)
command -v pdftoppm >/dev/null 2>&1 || need+=(poppler-utils)
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # the reading station's browser tests (Playwright drives it)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
bash scripts/viewer.sh  # the reading station's image viewer (npm, locked)
exec .venv/bin/python -m pytest "$@"
