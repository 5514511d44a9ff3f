"""Checks run before anything starts: a mistake fails the command in seconds, in one line naming the key.

:func:`preflight` is what ``python -m atropos_verl.train`` runs right after the config is
validated and before the API, gateway, environments, workers or replicas start. Each
check turns a failure that would otherwise surface minutes later (after the workers and
engines started, or as a silent wait for a batch that cannot form, or a hang inside
verl) into a :class:`~atropos_verl.config.ConfigError` naming the key and the fix.

* the model: its config loads from ``model.path``, and its position limit holds
  ``trainer.max_token_len`` and ``engine.max_model_len``;
* the environments: their scripts and modules exist, and their group sizes can fill
  ``trainer.batch_size`` (the API hands out whole groups only);
* the devices: ``trainer.device=cuda`` has a GPU, and the trainer's ranks and the replicas fit on
  this node's GPUs (:func:`~atropos_verl.placement.resolve_placement`);
* the ports the run binds are free, the run directory is writable, and
  ``trainer.resume_from`` names a checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from atropos_verl.atropos.environments import EnvironmentFailedError
from atropos_verl.atropos.environments import preflight as env_entries_exist
from atropos_verl.checkpoint import find_checkpoint
from atropos_verl.config import ConfigError, EnvSpec, RunConfig
from atropos_verl.netutil import port_is_free
from atropos_verl.placement import node_gpus, resolve_placement

# Group sizes of the built-in environments' config_init (kept equal by a unit test), so
# the batch check needs no import of atroposlib (seconds) for the common case.
BUILTIN_GROUP_SIZES = {"atropos_verl.envs.arithmetic": 8}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def preflight(cfg: RunConfig, run_dir: Optional[Path] = None) -> None:
    """Every check below, cheapest first; raises :class:`ConfigError` at the first failure."""
    check_run_dir(run_dir if run_dir is not None else Path(cfg.trainer.run_dir))
    check_resume(cfg)
    check_envs(cfg)
    check_ports(cfg)
    check_devices(cfg)
    check_model(cfg)


def check_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"trainer.run_dir: cannot write to {run_dir} ({exc.strerror or exc}); set trainer.run_dir to a "
            "writable folder"
        ) from None


def check_resume(cfg: RunConfig) -> None:
    if cfg.trainer.resume_from:
        try:
            find_checkpoint(Path(cfg.trainer.resume_from))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"trainer.resume_from: {exc}") from None


def flag_value(args: list[str], flag: str) -> Optional[str]:
    """The value of the last ``flag value`` or ``flag=value`` in ``args`` (the one argparse keeps)."""
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def env_group_size(spec: EnvSpec, index: int, data_group_size: Optional[int]) -> Optional[tuple[int, str]]:
    """(group size the environment will run with, the key that sets it), when known without starting it."""
    given = flag_value(spec.argv(), "--env.group_size")
    if given is not None:
        try:
            return int(given), f"--env.group_size in data.envs[{index}].args"
        except ValueError:
            return None
    if data_group_size is not None:
        return data_group_size, "data.group_size"
    default = BUILTIN_GROUP_SIZES.get(spec.module or "")
    return (default, f"the default of {spec.module}") if default is not None else None


def fills(batch_size: int, group_sizes: set[int]) -> bool:
    """Whether whole groups of these sizes can add up to exactly ``batch_size`` sequences."""
    reachable = [True] + [False] * batch_size
    for total in range(1, batch_size + 1):
        reachable[total] = any(size <= total and reachable[total - size] for size in group_sizes)
    return reachable[batch_size]


def check_envs(cfg: RunConfig) -> None:
    batch_size = cfg.trainer.batch_size
    try:
        env_entries_exist(cfg.data)
    except EnvironmentFailedError as exc:
        raise ConfigError(str(exc)) from None
    known = {}
    for index, spec in enumerate(cfg.data.envs):
        found = env_group_size(spec, index, cfg.data.group_size)
        if found is not None:
            known[spec.name] = found
    if not known or len(known) < len(cfg.data.envs):
        return
    if not fills(batch_size, {size for size, _ in known.values()}):
        shown = "; ".join(f"environment {name!r}: {size} ({source})" for name, (size, source) in known.items())
        raise ConfigError(
            f"trainer.batch_size: {batch_size} sequences per step cannot be made of whole groups ({shown}), so no "
            "batch would ever form; set trainer.batch_size to a multiple of the group size, or the group size to "
            "a divisor of it"
        )


def check_ports(cfg: RunConfig) -> None:
    engine = cfg.engine
    if engine.kind != "external":
        wanted = [("engine.gateway_port", engine.gateway_port)] if engine.gateway_port else []
        wanted += [("engine.gateway_extra_ports", port) for port in engine.gateway_extra_ports]
        for key, port in wanted:
            if not port_is_free(engine.gateway_host, port):
                raise ConfigError(
                    f"{key}: port {port} on {engine.gateway_host} is already in use; stop what listens there, "
                    "pick a free port, or leave engine.gateway_port null for any free port"
                )
    atropos = cfg.atropos
    parts = urlsplit(atropos.api_url)
    if atropos.start_api == "never" or parts.hostname not in LOOPBACK_HOSTS or parts.port is None:
        return
    host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
    if port_is_free(host, parts.port):
        return
    from atropos_verl.atropos.api_server import api_answers

    if atropos.start_api == "always":
        raise ConfigError(
            f"atropos.api_url: port {parts.port} is already in use and atropos.start_api=always starts the API "
            "there; pick a free port, or atropos.start_api=auto to use the API already running"
        )
    if not api_answers(atropos.api_url):
        raise ConfigError(
            f"atropos.api_url: port {parts.port} is in use by something that is not an Atropos API; pick a free "
            "port for the API the run starts"
        )


def check_devices(cfg: RunConfig) -> None:
    trainer = cfg.trainer
    if trainer.device == "cpu":
        return
    gpus = node_gpus()
    if trainer.device == "cuda" and not gpus:
        raise ConfigError("trainer.device: cuda, but torch sees no CUDA GPU here; set trainer.device=cpu or auto")
    if gpus:
        # The run's own check (GPU count, replica GPUs), run now rather than once the API and envs are up.
        resolve_placement(trainer, cfg.engine, "cuda", gpus)


def check_model(cfg: RunConfig) -> None:
    from atropos_verl.assets import resolve_model_path
    from atropos_verl.modelinfo import model_info

    try:
        path = resolve_model_path(cfg.model.path)
        info = model_info(path, cfg.model.trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for an unloadable config
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.path: cannot load the model's config from {cfg.model.path!r} ({first}); set model.path to a "
            "local model folder, a hub id this machine can download, or builtin:<name>"
        ) from None
    limit = info.max_position_embeddings
    if limit is None:
        return
    lengths = [("trainer.max_token_len", cfg.trainer.max_token_len)]
    if cfg.engine.kind != "external":
        lengths.append(("engine.max_model_len", cfg.engine.max_model_len))
    for key, value in lengths:
        if value > limit:
            raise ConfigError(
                f"{key}: {value} exceeds the model's {limit} positions (max_position_embeddings of "
                f"{cfg.model.path}); set trainer.max_token_len and engine.max_model_len to at most {limit}"
            )
