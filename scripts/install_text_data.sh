#!/bin/sh
# Install the Debian documentation packages that sinklora_ext reads its long English text from
# (sinklora_ext.data.CORPORA). Idempotent: does nothing when every package's files are present.
#
#   scripts/install_text_data.sh                  # debian-reference-en gnu-standards bash-doc (~5 MB)
#   scripts/install_text_data.sh debian-reference-en
#
# The default corpus (debian-reference-en, 1.7 MB) lives in /usr/share/debian-reference. The other
# two live under /usr/share/doc, which slim Docker images tell dpkg to drop
# (/etc/dpkg/dpkg.cfg.d/docker); the install re-includes exactly their files.
set -eu

PACKAGES=${*:-"debian-reference-en gnu-standards bash-doc"}

marker() {
    case "$1" in
        debian-reference-en) echo /usr/share/debian-reference/ch01.en.html ;;
        gnu-standards) echo /usr/share/doc/gnu-standards/standards.html ;;
        bash-doc) echo /usr/share/doc/bash/bashref.html ;;
        *) echo "" ;;
    esac
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

todo=""
reinstall=""
for pkg in $PACKAGES; do
    m=$(marker "$pkg")
    if installed "$pkg" && { [ -z "$m" ] || [ -f "$m" ]; }; then
        continue
    fi
    todo="$todo $pkg"
    if installed "$pkg"; then reinstall="--reinstall"; fi
done

if [ -z "$todo" ]; then
    echo "install_text_data: already installed:$(printf ' %s' $PACKAGES)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_text_data: apt-get not found; install$todo with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_text_data: run as root (or install sudo) to apt-get install$todo" >&2
        exit 1
    fi
fi

echo "install_text_data: installing$todo"
include="-o DPkg::Options::=--path-include=/usr/share/doc/gnu-standards/* -o DPkg::Options::=--path-include=/usr/share/doc/bash/*"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
if ! $SUDO apt-get install -y -q --no-install-recommends $reinstall $include $todo; then
    $SUDO apt-get update -q
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q --no-install-recommends $reinstall $include $todo
fi

for pkg in $todo; do
    m=$(marker "$pkg")
    if [ -n "$m" ] && [ ! -f "$m" ]; then
        echo "install_text_data: $pkg is installed but $m is missing (dpkg path-exclude?)" >&2
        exit 1
    fi
done
echo "install_text_data: done"
