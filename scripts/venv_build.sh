# Sourced by build_venv.sh and build_gpu_venv.sh: the steps every venv build shares.
# scripts/sglang_cpu/install.sh writes the same steps out: its files key SGLang's venv (Makefile).

# start_venv_build PYTHON VENV MESSAGE: take VENV's build lock (held until the calling script
# exits); stop that script there (exit 0) when VENV is complete, else create VENV afresh with
# PYTHON. A venv is not relocatable, so it is built in place and marked complete only at the end
# (finish_venv_build); an incomplete one is rebuilt.
start_venv_build() {
    local python="$1" venv="$2" message="$3"
    mkdir -p "$(dirname "$venv")"
    exec 9>"$venv.lock"
    flock 9
    if [ -f "$venv/.complete" ]; then
        exit 0
    fi
    rm -rf "$venv"
    echo "$message"
    "$python" -m venv "$venv"
}

# finish_venv_build VENV: VENV is built.
finish_venv_build() {
    touch "$1/.complete"
}
