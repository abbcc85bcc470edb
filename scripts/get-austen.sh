#!/usr/bin/env bash
# Make Jane Austen's novels (Debian's r-cran-janeaustenr) available to thanos-deploy, without R:
# the .deb is downloaded with apt and unpacked into the cache folder. Nothing to do when the
# package is already installed system-wide or unpacked.
set -euo pipefail
cache="${THANOS_DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/thanos-deploy}"
for root in /usr/lib/R/site-library /usr/local/lib/R/site-library /usr/lib/R/library "$cache/janeaustenr/usr/lib/R/site-library"; do
  if [ -f "$root/janeaustenr/data/Rdata.rdb" ]; then exit 0; fi
done
if ! command -v apt-get >/dev/null; then
  echo "get-austen: apt-get is not available; install r-cran-janeaustenr by hand or use --calib PATH" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download r-cran-janeaustenr >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null; fi
  apt-get download r-cran-janeaustenr >/dev/null
fi
mkdir -p "$cache"
rm -rf "$cache/janeaustenr.tmp"
dpkg-deb -x r-cran-janeaustenr_*.deb "$cache/janeaustenr.tmp"
rm -rf "$cache/janeaustenr"
mv "$cache/janeaustenr.tmp" "$cache/janeaustenr"
echo "get-austen: unpacked r-cran-janeaustenr into $cache/janeaustenr"
