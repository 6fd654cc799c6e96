#!/usr/bin/env bash
# Make sure Debian's headless-capable Chromium and its matching chromedriver are installed,
# for the dashboard browser test (tests/test_compare.py). Nothing is downloaded from a
# browser vendor: both come from the distribution's packages.
# Exit codes: 0 both present, 3 they cannot be installed here (callers skip), 1 other errors.
set -euo pipefail
say() { echo "install_chromium: $*" >&2; }
have() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }
have && exit 0
command -v apt-get >/dev/null || { say "chromium is absent and there is no apt-get"; exit 3; }
[[ "$(id -u)" == 0 ]] || { say "chromium is absent and installing it needs root"; exit 3; }
log="${TMPDIR:-/tmp}/lethe-chromium-apt.log"
export DEBIAN_FRONTEND=noninteractive
opts=(-q -y -o DPkg::Lock::Timeout=600 --no-install-recommends)
say "installing chromium and chromium-driver with apt-get (once per machine)"
if ! apt-get "${opts[@]}" install chromium chromium-driver >"$log" 2>&1; then
  apt-get -q -o DPkg::Lock::Timeout=600 update >>"$log" 2>&1 || { say "apt-get update failed (see $log)"; exit 3; }
  apt-get "${opts[@]}" install chromium chromium-driver >>"$log" 2>&1 \
    || { say "apt-get install chromium chromium-driver failed (see $log)"; exit 3; }
fi
have || { say "chromium/chromedriver still absent after apt-get install"; exit 3; }
