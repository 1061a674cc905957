#!/usr/bin/env bash
# Install a headless Chromium for the dashboard browser tests (tests/stream/test_dashboard_browser.py).
# Idempotent: does nothing when /usr/bin/chromium (or chromium on PATH) is already there.
# Installs the Debian `chromium` package (~47 s, ~480 MB); Python Playwright drives it through
# executable_path="/usr/bin/chromium", so `playwright install` (a download) is never needed.
# The Python `playwright` package itself comes from pip (the project's dev extra).
set -euo pipefail

find_chromium() {
    if [ -x /usr/bin/chromium ]; then echo /usr/bin/chromium; return 0; fi
    command -v chromium 2>/dev/null && return 0
    return 1
}

if path="$(find_chromium)"; then
    echo "chromium already installed: ${path} ($("${path}" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium
    path="$(find_chromium)" || { echo "chromium still not found after apt-get install" >&2; exit 1; }
    echo "installed ${path} ($("${path}" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

cat >&2 <<'MSG'
chromium is not installed and this script cannot install it (needs root and apt-get).
Do one of:
  - sudo deploy/install-browser.sh                 (or: sudo apt-get install -y chromium)   Debian/Ubuntu
  - install Chromium/Chrome another way and point the tests at it; they look for /usr/bin/chromium
    and skip (with a reason) when it is missing.
The Python side needs `pip install playwright` (the dev extra); `playwright install` is not needed.
MSG
exit 1
