"""Entry point: ``python -m atropos_verl.train model=... engine=... data=... advantage=...``.

Hydra composes ``atropos_verl/conf/config.yaml`` with the chosen groups (``--cfg job`` prints
the result, ``-m`` runs sweeps); the typed config is validated and preflighted
(:mod:`atropos_verl.preflight`) before anything starts, then the trainer runs until ``trainer.total_training_steps``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from atropos_verl.config import ConfigError, load_config
from atropos_verl.preflight import preflight
from atropos_verl.verl_keys import unknown_override

# Shipped inside the package, so an installed wheel composes the same configs as a checkout.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")

logger = logging.getLogger("atropos_verl")


def main() -> None:
    """The command: overrides naming verl's keys (or misspelt ones) are explained before Hydra composes."""
    problem = unknown_override(sys.argv[1:])
    if problem is not None:
        print(f"configuration error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    run()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def run(cfg: DictConfig) -> None:
    try:
        run_config = load_config(cfg)
        # Before anything starts: a wrong path, length, port or device fails here in seconds.
        preflight(run_config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    from atropos_verl.atropos.environments import EnvironmentFailedError
    from atropos_verl.trainer import Trainer

    trainer = Trainer(run_config)
    try:
        run_dir = asyncio.run(trainer.run())
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except EnvironmentFailedError as exc:
        print(f"environment failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except BaseException as exc:
        # A stop signal ends the run with 128 + its number once everything it started is
        # stopped, whatever the cancellation surfaced as while unwinding.
        received = trainer.signals.received
        if received is None:
            raise
        if isinstance(exc, asyncio.CancelledError):
            logger.warning("stopped by %s", received.name)
        else:
            logger.exception("stopped by %s; stopping raised", received.name)
        raise SystemExit(trainer.signals.exit_code) from None
    logger.info("run finished: %s", run_dir)


if __name__ == "__main__":
    main()
