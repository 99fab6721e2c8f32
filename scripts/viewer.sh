#!/usr/bin/env bash
# Install the reading station's image viewer (OHIF's prebuilt viewer, npm @ohif/app) from the npm
# registry, exactly as reader/viewer/package-lock.json pins it; nothing runs at install time, nothing
# is fetched at run time. Skipped when the locked version is already installed.
set -euo pipefail
cd "$(dirname "$0")/../reader/viewer"
want=$(python3 -c 'import json; print(json.load(open("package-lock.json"))["packages"]["node_modules/@ohif/app"]["version"])')
have=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' node_modules/@ohif/app/package.json 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
fi
