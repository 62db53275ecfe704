#!/usr/bin/env bash
# Renders an HTML report in headless Chromium, saves a screenshot and fails
# on any console message (CSP violations, blocked loads, errors).
#
#   scripts/check_html.sh REPORT.html OUT.png [HEIGHT]
#
# Exit codes: 0 clean, 1 console messages or no screenshot, 2 usage or
# Chromium missing (Debian: apt-get install -y chromium; CHROMIUM=path overrides).
# The page has no script, so any console line is a problem: Chromium logs
# console messages and CSP violations to stderr as "...:CONSOLE:<line>] ..."
# with --enable-logging=stderr.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [HEIGHT]" >&2
  exit 2
fi
html=$1
png=$2
height=${3:-6000}
[ -f "$html" ] || { echo "$html: no such file" >&2; exit 2; }
chromium=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$chromium" ] || [ ! -x "$chromium" ]; then
  echo "chromium not found: apt-get install -y chromium (or set CHROMIUM)" >&2
  exit 2
fi

profile=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$profile" "$log"' EXIT
url="file://$(realpath "$html")"
mkdir -p "$(dirname "$png")"
rm -f "$png"

# Flags for root in a container, no network chatter, a fresh profile.
if ! timeout 120 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic \
  --no-first-run --disable-background-networking --disable-component-update \
  --disable-sync --disable-default-apps --user-data-dir="$profile" \
  --enable-logging=stderr --v=0 --hide-scrollbars --force-device-scale-factor=1 \
  --window-size=1280,"$height" --screenshot="$png" "$url" 2>"$log"; then
  echo "chromium failed:" >&2
  cat "$log" >&2
  exit 1
fi
if [ ! -s "$png" ]; then
  echo "chromium wrote no screenshot:" >&2
  cat "$log" >&2
  exit 1
fi
if grep -E ':CONSOLE[:(]|Content Security Policy' "$log" >&2; then
  echo "$html: console messages above (CSP violation or error)" >&2
  exit 1
fi
echo "ok: $html rendered without console messages; screenshot $png"
