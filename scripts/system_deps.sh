#!/usr/bin/env bash
# System packages the tests need that PyPI cannot provide: Debian's Chromium for the browser
# tests of the web page. Installs only what is missing; never fails the run by itself (the
# browser tests then skip with a reason).
set -uo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[rscir] installing chromium for the browser tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[rscir] could not install chromium; browser tests will skip" >&2
  fi
fi
exit 0
