#!/usr/bin/env bash
# Installs the Debian packages whose files the built-in tasks read (see docs/DATA in README):
# real data that ships inside packages, so nothing is downloaded at run time.
# Idempotent: does nothing when every package is already installed.
set -euo pipefail

PACKAGES=(
  dataset-fashion-mnist   # Fashion-MNIST images
  fonts-noto-color-emoji  # emoji pictures with their Unicode names
  espeak-ng               # spoken words
  fortunes                # quotes by category
  bible-kjv               # text corpus
  wordnet-base            # definitions and noun categories
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system packages missing: ${missing[*]}" >&2
  echo "apt-get is not available here: install them with your package manager; the tasks that need them will say so." >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "system packages missing: ${missing[*]}; run as root: apt-get install ${missing[*]}" >&2
    exit 0
  fi
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system packages: installed"
