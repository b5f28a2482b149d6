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
extras=""; [ "$want" = test ] && extras="[test]"
stamp="$venv/.mm-installed$( [ "$want" = test ] && echo -test)"
key=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
    echo "[setup] installing mm$extras into $venv (first time: ~5 GB for torch, a few minutes)"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c constraints.txt -e ".$extras"
    echo "$key" > "$stamp"
fi

if [ "$want" = test ] && ! command -v chromium >/dev/null; then
    echo "[setup] installing Debian's chromium for the browser test"
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "[setup] ready: $venv/bin/python"
