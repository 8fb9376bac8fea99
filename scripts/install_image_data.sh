#!/bin/sh
# Install the Debian package that sinklora_ext.tic reads its images from: dataset-fashion-mnist
# (MIT; 60,000 + 10,000 grey 28x28 images in /usr/share/datasets/fashion-mnist/*-ubyte.gz).
# Idempotent: does nothing when the four files are present.
#
#   scripts/install_image_data.sh
set -eu

PACKAGE=dataset-fashion-mnist
DIR=/usr/share/datasets/fashion-mnist
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

missing() {
    for f in $FILES; do
        [ -f "$DIR/$f" ] || { echo "$DIR/$f"; return 0; }
    done
    return 1
}

if ! missing >/dev/null; then
    echo "install_image_data: already installed: $PACKAGE ($DIR)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_image_data: apt-get not found; install $PACKAGE with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_image_data: run as root (or install sudo) to apt-get install $PACKAGE" >&2
        exit 1
    fi
fi

reinstall=""
if dpkg-query -W -f='${Status}' "$PACKAGE" 2>/dev/null | grep -q "install ok installed"; then
    reinstall="--reinstall"
fi
echo "install_image_data: installing $PACKAGE"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends $reinstall "$PACKAGE"; then
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends $reinstall "$PACKAGE"
fi

if gone=$(missing); then
    echo "install_image_data: $PACKAGE is installed but $gone is missing (dpkg path-exclude?)" >&2
    exit 1
fi
echo "install_image_data: done"
