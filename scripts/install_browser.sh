#!/usr/bin/env bash
# Test set-up for the playground's browser tests (tests/playground): Debian's headless Chromium
# and its WebDriver from the distribution's packages (chromium, chromium-driver). `.ci/run` calls
# this before the tests; the user's install command (scripts/install.sh) does not. Idempotent.
# Under CI=true a browser that cannot be installed fails the run (exit 1); elsewhere this warns,
# exits 0, and the browser tests skip with the reason. LYCHEE_CHROMIUM / LYCHEE_CHROMEDRIVER name
# a browser and driver installed some other way.
set -euo pipefail

chromium_bin=${LYCHEE_CHROMIUM:-$(command -v chromium || true)}
driver_bin=${LYCHEE_CHROMEDRIVER:-$(command -v chromedriver || true)}
have() { [ -n "$chromium_bin" ] && [ -x "$chromium_bin" ] && [ -n "$driver_bin" ] && [ -x "$driver_bin" ]; }
version() { "$chromium_bin" --version 2>/dev/null | head -1; }

if have; then
  echo "install_browser.sh: $(version), $("$driver_bin" --version 2>/dev/null | cut -d' ' -f1-2)"
  exit 0
fi

case "${CI:-}" in 1 | true | TRUE | True | yes) ci=1 ;; *) ci=0 ;; esac
fail() {
  echo "install_browser.sh: $*" >&2
  if [ "$ci" = 1 ]; then
    echo "install_browser.sh: CI=true: the browser tests must run, so this fails the run" >&2
    exit 1
  fi
  echo "install_browser.sh: the browser tests (tests/playground) will be skipped" >&2
  exit 0
}

command -v apt-get >/dev/null 2>&1 ||
  fail "no apt-get here: install Chromium and its chromedriver, or set LYCHEE_CHROMIUM and LYCHEE_CHROMEDRIVER"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    fail "not root and no password-less sudo: cannot apt-get install chromium chromium-driver"
  fi
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q >/dev/null || fail "apt-get update failed"
"${sudo[@]}" apt-get install -y -q chromium chromium-driver >/dev/null ||
  fail "apt-get install -y chromium chromium-driver failed"
chromium_bin=$(command -v chromium || true)
driver_bin=$(command -v chromedriver || true)
have || fail "chromium or chromedriver is still missing after the install"
echo "install_browser.sh: installed $(version)"
