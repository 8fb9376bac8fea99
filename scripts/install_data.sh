#!/bin/sh
# Install the Debian packages that sinklora_ext reads its real data from: the documentation it
# takes long English text from (sinklora_ext.data.CORPORA) and dataset-fashion-mnist (MIT; 60,000 +
# 10,000 grey 28x28 images, sinklora_ext.tic.data). Idempotent: does nothing when every package's
# files are present.
#
#   scripts/install_data.sh                   # debian-reference-en gnu-standards bash-doc dataset-fashion-mnist
#   scripts/install_data.sh debian-reference-en
#
# The default corpus (debian-reference-en, 1.7 MB) lives in /usr/share/debian-reference. The other
# two live under /usr/share/doc, which slim Docker images tell dpkg to drop
# (/etc/dpkg/dpkg.cfg.d/docker); the install re-includes exactly their files.
set -eu

PACKAGES=${*:-"debian-reference-en gnu-standards bash-doc dataset-fashion-mnist"}

marker() {
    case "$1" in
        debian-reference-en) echo /usr/share/debian-reference/ch01.en.html ;;
        gnu-standards) echo /usr/share/doc/gnu-standards/standards.html ;;
        bash-doc) echo /usr/share/doc/bash/bashref.html ;;
        dataset-fashion-mnist) echo /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ;;
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
    echo "install_data: already installed:$(printf ' %s' $PACKAGES)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_data: apt-get not found; install$todo with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_data: run as root (or install sudo) to apt-get install$todo" >&2
        exit 1
    fi
fi

echo "install_data: installing$todo"
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
        echo "install_data: $pkg is installed but $m is missing (dpkg path-exclude?)" >&2
        exit 1
    fi
done
echo "install_data: done"
