#!/usr/bin/env bash
# The test suite, in the project's own environment. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The web console's tests drive Debian's headless Chromium (tests/test_ui_browser.py); as root with apt, install it
# once when missing (about 30 s). Elsewhere those tests skip, naming what is missing.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing chromium and chromium-driver (Debian packages) for the web console's browser tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "test: could not install chromium; the browser tests will skip" >&2
fi
. .venv/bin/activate
exec python -m pytest "$@"
