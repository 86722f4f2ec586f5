#!/usr/bin/env bash
# Fetches the Tux Paint stamps (real pictures with English captions) into DEST without
# installing the package: `apt-get download tuxpaint-stamps-default` (a 161 MB .deb), then only
# its *.png and *.txt files are extracted (about 30 MB) and the .deb is deleted.
#
#   bash scripts/fetch_tuxpaint.sh [DEST]
#
# DEST defaults to $GENERALIST_CACHE/tuxpaint (else ~/.cache/generalist/tuxpaint), where
# `generalist.data.sources.tuxpaint` looks. Idempotent: a finished fetch leaves DEST/.complete
# and a rerun does nothing. The files are extracted into a temporary folder next to DEST and
# moved into place at the end, so an interrupted run never leaves a half-filled DEST.
set -euo pipefail

PACKAGE=tuxpaint-stamps-default
DEST="${1:-${GENERALIST_CACHE:-$HOME/.cache/generalist}/tuxpaint}"
DEST="$(realpath -m "$DEST")"  # the work below happens in another folder

if [ -f "$DEST/.complete" ]; then
  echo "tuxpaint stamps: already in $DEST"
  exit 0
fi
for tool in apt-get dpkg-deb tar; do
  command -v "$tool" >/dev/null 2>&1 || { echo "fetch_tuxpaint: needs $tool (a Debian-based system)" >&2; exit 1; }
done

mkdir -p "$(dirname "$DEST")"
WORK="$(mktemp -d "$(dirname "$DEST")/.tuxpaint-fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

cd "$WORK"
if ! apt-get download -qq "$PACKAGE" 2>apt.log; then
  # The package lists may be missing or stale on a fresh machine.
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
  else
    cat apt.log >&2
    echo "fetch_tuxpaint: apt-get download $PACKAGE failed; run 'apt-get update' as root and retry" >&2
    exit 1
  fi
  apt-get download -qq "$PACKAGE"
fi
DEB="$(ls "$WORK"/${PACKAGE}_*.deb)"

mkdir -p "$WORK/tree"
VERSION="$(dpkg-deb -f "$DEB" Version)"
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$WORK/tree" --wildcards '*.png' '*.txt'
rm -f "$DEB"
test -d "$WORK/tree/usr/share/tuxpaint/stamps" || { echo "fetch_tuxpaint: no stamps folder in $PACKAGE" >&2; exit 1; }
n_png="$(find "$WORK/tree" -name '*.png' | wc -l)"
echo "$PACKAGE $VERSION" > "$WORK/tree/.complete"

rm -rf "$DEST"
mv "$WORK/tree" "$DEST"
echo "tuxpaint stamps: $n_png pictures in $DEST"
