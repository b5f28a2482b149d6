#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with mm installed (editable) and pinned torch.
#   bash setup.sh          # what training needs
#   bash setup.sh test     # + test tools and Debian's chromium (for the browser test of the demo)
# Re-running is fast: pip is skipped while pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")"
want=${1:-run}
venv=.venv
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$py" -m venv "$venv"
fi
case "$want" in
    run) extras="" ;;
    test) extras="[test]" ;;
    *) echo "usage: bash setup.sh [run|test]" >&2; exit 2 ;;
esac
stamp="$venv/.mm-installed-$want"
key=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
    echo "[setup] installing mm$extras into $venv (first time: ~5 GB for torch, a few minutes)"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c constraints.txt -e ".$extras"
    echo "$key" > "$stamp"
fi

# Debian packages: curl opens http(s):// shards (webdataset pipes through it); espeak-ng and the word lists
# build the ASR recipe's built-in corpus (data_tools/synthetic_asr.py: APT_PACKAGES); chromium runs the
# demos' browser tests.
apt_pkgs="curl espeak-ng wamerican wngerman wfrench wspanish witalian wpolish wswedish wukrainian hunspell-ru hunspell-el"
if [ "$want" = test ]; then apt_pkgs="$apt_pkgs chromium"; fi
missing=$(for p in $apt_pkgs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
    echo "[setup] installing Debian packages:" $missing
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
echo "[setup] ready: $venv/bin/python"
