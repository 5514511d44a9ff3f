"""Run an unmodified Atropos environment with :mod:`atropos_verl.atropos.compat` applied.

    python -m atropos_verl.atropos.run_env path/to/env_server.py serve --env.group_size 8 ...
    python -m atropos_verl.atropos.run_env -m my_envs.gsm8k serve ...

The environment runs as ``__main__`` exactly as ``python script.py`` / ``python -m
module`` would run it (same ``sys.argv`` after the entry, same ``sys.path[0]``), so its
``if __name__ == "__main__": Env.cli()`` starts it. The trainer starts every environment
of ``data.envs`` through this command.

The gateway's bearer token travels in ``ATROPOS_VERL_OPENAI_API_KEY`` rather than argv
(argv is readable by every user of the machine); it is handed to the environment as
``--openai.api_key`` right after the subcommand, so a key given on the command line
still wins.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from atropos_verl.atropos import compat

API_KEY_ENV = "ATROPOS_VERL_OPENAI_API_KEY"
USAGE = "usage: python -m atropos_verl.atropos.run_env (SCRIPT.py | -m MODULE) serve [ARGS...]"


def main(argv: list[str]) -> None:
    if argv[:1] == ["-m"] and len(argv) >= 2:
        module, rest = argv[1], argv[2:]
        script = None
    elif argv and not argv[0].startswith("-"):
        module, script, rest = None, argv[0], argv[1:]
    else:
        sys.exit(USAGE)
    key = os.environ.pop(API_KEY_ENV, None)
    if key and rest and not rest[0].startswith("-"):
        rest = [rest[0], "--openai.api_key", key, *rest[1:]]
    compat.apply()
    if script is not None:
        if not Path(script).is_file():
            sys.exit(f"can't open file {script!r}: no such file")
        sys.argv = [script, *rest]
        sys.path[0] = str(Path(script).resolve().parent)
        runpy.run_path(script, run_name="__main__")
    else:
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
