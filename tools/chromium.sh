#!/usr/bin/env bash
# Install Debian's `chromium` for the headless-browser test of the HTML report (tests/test_reports.py).
# Best effort: never fails the caller. Without root (or passwordless sudo) or apt-get it prints one line
# saying so and exits 0; the browser test then skips with its reason.
set -u
for b in chromium chromium-browser; do
  if command -v "$b" >/dev/null 2>&1; then
    echo "chromium.sh: $b already installed ($(command -v "$b"))"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium.sh: no apt-get here: install chromium with your package manager to run the browser test"
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "chromium.sh: not root and no passwordless sudo: as root, run apt-get install chromium for the browser test"
  exit 0
fi
log="$(mktemp)"
if "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1 \
   && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
      >>"$log" 2>&1; then
  echo "chromium.sh: installed $(command -v chromium)"
  rm -f "$log"
else
  echo "chromium.sh: apt-get could not install chromium (log: $log); the browser test will skip"
fi
exit 0
