"""The training loop: Atropos batch → validated groups → advantages → verl update → metrics.

Read :meth:`Trainer.run` top to bottom; each stage lives in its own module:

    atropos.client   fetch a batch of scored groups from the trajectory API
    groups           validate every group; reject bad ones with a reason
    advantages       per-token advantages (env-given, or from scores)
    batch            pack into verl's no-padding TensorDict (shifted layout)
    actor            verl FSDP2 TrainingWorkers run the advantage-weighted token loss
    serving          (engine=vllm|sglang) replicas + gateway; weights synced and proven after each step
    spool            every fetched batch is durable until a checkpoint covers it (replayed on resume)
    launch           the Atropos API and the supervised environments, when the run starts them
    metrics, report  metrics.jsonl + verl Tracking; progress bar, summary, curves
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from atropos_verl.actor import Actor
from atropos_verl.advantages import token_advantages
from atropos_verl.assets import resolve_model_path
from atropos_verl.atropos import ApiServerProcess, AtroposAPIError, AtroposClient, TrainerRegistration
from atropos_verl.batch import build_batch
from atropos_verl.config import RunConfig
from atropos_verl.groups import GroupLimits, GroupRejected, ScoredGroup, describe, parse_group
from atropos_verl.launch import EnvironmentFailedError, EnvSupervisor, ensure_api
from atropos_verl.metrics import MetricsLogger
from atropos_verl.report import ProgressBar, finish
from atropos_verl.serving import InferenceService
from atropos_verl.spool import GroupSpool

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"


def vocab_size_of(model_path: str, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


@dataclass
class ValidatedBatch:
    groups: list[ScoredGroup]
    rejected: list[GroupRejected]


def validate_batch(raw_groups: list[Any], step: int, limits: GroupLimits) -> ValidatedBatch:
    groups, rejected = [], []
    for index, raw in enumerate(raw_groups):
        group_id = describe(raw, index, step)
        try:
            groups.append(parse_group(raw, group_id, limits))
        except GroupRejected as rejection:
            logger.warning("rejected %s", rejection)
            rejected.append(rejection)
    return ValidatedBatch(groups, rejected)


def reward_metrics(groups: list[ScoredGroup]) -> dict[str, float]:
    scores = np.array([s for g in groups for s in g.scores], dtype=np.float64)
    metrics = {
        "reward/mean": float(scores.mean()),
        "reward/std": float(scores.std()),
        "reward/min": float(scores.min()),
        "reward/max": float(scores.max()),
    }
    reported: dict[str, list[float]] = {}
    for group in groups:
        for key, value in group.env_metrics.items():
            reported.setdefault(key, []).append(value)
    metrics.update({f"env/{key}": float(np.mean(values)) for key, values in reported.items()})
    return metrics


def _cancel_on_sigterm() -> None:
    """SIGTERM unwinds the run like Ctrl-C, so every process it started is stopped."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)


def sync_probe(groups: list[ScoredGroup], cfg: RunConfig) -> list[list[int]]:
    """Sequences the trainer just trained on, cut to what a replica accepts as a prompt."""
    limit = cfg.engine.max_model_len - 1
    sequences = [tokens[:limit] for group in groups for tokens in group.tokens]
    return sequences[: cfg.engine.sync_probe_sequences]


class CheckpointDir:
    """``<run_dir>/checkpoints/global_step_N/{actor/, trainer_state.json}`` plus a latest pointer."""

    def __init__(self, root: Path, keep: Optional[int]):
        self.root = root
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.root / f"global_step_{step}"

    def latest_step(self) -> Optional[int]:
        pointer = self.root / LATEST_FILE
        if not pointer.exists():
            return None
        return int(pointer.read_text().strip())

    def load_state(self, step: int) -> dict[str, Any]:
        return json.loads((self.step_dir(step) / STATE_FILE).read_text())

    def commit(self, step: int, state: dict[str, Any]) -> None:
        """Write the trainer state, then move the latest pointer: a crash mid-save leaves the old one valid."""
        (self.step_dir(step) / STATE_FILE).write_text(json.dumps(state, indent=2))
        tmp = self.root / f".{LATEST_FILE}.tmp"
        tmp.write_text(str(step))
        tmp.replace(self.root / LATEST_FILE)
        if self.keep:
            steps = sorted(int(p.name.split("_")[-1]) for p in self.root.glob("global_step_*"))
            for old in steps[: -self.keep]:
                shutil.rmtree(self.step_dir(old), ignore_errors=True)


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir).resolve()
        self.checkpoints = CheckpointDir(self.run_dir / "checkpoints", cfg.trainer.max_ckpt_to_keep)
        self.api_url = cfg.atropos.api_url
        self.step = 0
        self.groups_rejected_total = 0
        self.groups_trained_total = 0

    def _registration(self) -> TrainerRegistration:
        t = self.cfg.trainer
        return TrainerRegistration(
            wandb_group=self.cfg.atropos.wandb_group,
            wandb_project=self.cfg.atropos.wandb_project,
            batch_size=t.batch_size,
            max_token_len=t.max_token_len,
            checkpoint_dir=str(self.checkpoints.root),
            save_checkpoint_interval=t.save_freq,
            starting_step=self.step,
            num_steps=t.total_training_steps,
        )

    def _client(self) -> AtroposClient:
        a = self.cfg.atropos
        return AtroposClient(
            api_url=self.api_url,
            registration=self._registration(),
            request_timeout_s=a.request_timeout,
            connect_deadline_s=a.timeout,
            poll_interval_s=a.poll_interval,
            max_poll_interval_s=a.max_poll_interval,
            max_retries=a.max_retries,
            reset_on_mismatch=a.reset_on_mismatch,
        )

    def _save(self, actor: Actor) -> None:
        actor.save_checkpoint(str(self.checkpoints.step_dir(self.step) / "actor"), self.step)
        self.checkpoints.commit(
            self.step,
            {
                "step": self.step,
                "groups_trained_total": self.groups_trained_total,
                "groups_rejected_total": self.groups_rejected_total,
            },
        )
        logger.info("checkpoint saved at step %d: %s", self.step, self.checkpoints.step_dir(self.step))

    def _resume_point(self) -> Optional[int]:
        """Restore the loop's counters from the latest checkpoint; weights are loaded once workers exist."""
        latest = self.checkpoints.latest_step() if self.cfg.trainer.resume == "auto" else None
        if latest is None:
            return None
        state = self.checkpoints.load_state(latest)
        self.step = state["step"]
        self.groups_trained_total = state["groups_trained_total"]
        self.groups_rejected_total = state["groups_rejected_total"]
        return latest

    async def run(self) -> Path:
        cfg = self.cfg
        started_at = time.monotonic()
        model_path = resolve_model_path(cfg.model.path)
        limits = GroupLimits(
            vocab_size=vocab_size_of(model_path, cfg.model.trust_remote_code), max_token_len=cfg.trainer.max_token_len
        )
        resume_step = self._resume_point()
        metrics_logger = MetricsLogger(
            self.run_dir,
            cfg.trainer.project_name,
            cfg.trainer.experiment_name,
            [b for b in cfg.trainer.logger if b != "file"],
        )
        _cancel_on_sigterm()
        spool_path = self.run_dir / "spool.sqlite"
        if cfg.trainer.resume == "disable":
            # A fresh start owes nothing to batches an earlier run in this folder fetched.
            for leftover in self.run_dir.glob("spool.sqlite*"):
                leftover.unlink()
        spool = GroupSpool(spool_path)
        replay = spool.start_attempt(resume_step or 0)
        if replay:
            logger.info("replaying %d fetched batches that no checkpoint includes", len(replay))
        api: Optional[ApiServerProcess] = None
        actor: Optional[Actor] = None
        service: Optional[InferenceService] = None
        envs = EnvSupervisor(cfg, self.run_dir / "envs")
        try:
            api = await ensure_api(cfg, self.run_dir / "logs")
            self.api_url = api.url if api is not None else cfg.atropos.api_url
            if cfg.engine.kind != "external":
                service = InferenceService(cfg, model_path, self.run_dir)
            async with self._client() as client:
                # Fail fast on an unreachable API before spending time on workers and engines.
                await client.wait_until_reachable()
                if service is not None:
                    await service.start_gateway()
                # Environments load while the workers and replicas start; they wait for the
                # trainer's registration (and the gateway for replicas) on their own.
                envs.start(
                    self.api_url,
                    model_path,
                    (service.url, service.model_name) if service is not None else None,
                    service.api_key if service is not None else None,
                )
                actor = await self._start(model_path, service)
                if resume_step is not None:
                    await asyncio.to_thread(actor.load_checkpoint, str(self.checkpoints.step_dir(resume_step) / "actor"))
                    logger.info("resumed from %s at step %d", self.checkpoints.step_dir(resume_step), self.step)
                if service is not None:
                    service.attach(actor, self.step)
                    service.start_monitor()
                    if resume_step is not None:
                        # Replicas started from the base weights; serve the checkpoint's instead.
                        await service.sync(self.step, probe=[])
                await client.register()
                await self._train(client, actor, limits, metrics_logger, service, envs, spool, replay)
            finish(self.run_dir, started_at)
            return self.run_dir
        finally:
            await envs.stop()
            metrics_logger.close()
            spool.close()
            if service is not None:
                await service.stop()
            if actor is not None:
                actor.shutdown()
            if api is not None:
                api.stop()

    async def _start(self, model_path: str, service: Optional[InferenceService]) -> Actor:
        """Start the policy workers and, concurrently, the inference replicas (both take a while)."""
        results = await asyncio.gather(
            asyncio.to_thread(Actor, self.cfg, model_path),
            service.start_replicas() if service is not None else asyncio.sleep(0),
            return_exceptions=True,
        )
        actor = results[0]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            if isinstance(actor, Actor):
                actor.shutdown()
            raise failure
        return actor

    async def _fetch(self, client: AtroposClient, envs: EnvSupervisor) -> list[dict]:
        """The next batch, riding out API outages and restarts for up to ``atropos.batch_timeout``."""
        deadline = self.cfg.atropos.batch_timeout
        give_up_at = None if deadline is None else time.monotonic() + deadline
        while True:
            remaining = None if give_up_at is None else max(give_up_at - time.monotonic(), 0.0)
            try:
                raw_groups = await client.next_batch(deadline_s=remaining, stop=envs.failed)
            except AtroposAPIError as error:
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    raise
                logger.warning("%s; retrying until atropos.batch_timeout", error)
                await asyncio.sleep(min(self.cfg.atropos.max_poll_interval, 5.0))
                continue
            if raw_groups is None:
                raise EnvironmentFailedError(envs.failure or "an environment failed")
            return raw_groups

    async def _train(
        self,
        client: AtroposClient,
        actor: Actor,
        limits: GroupLimits,
        metrics_logger: MetricsLogger,
        service: Optional[InferenceService],
        envs: EnvSupervisor,
        spool: GroupSpool,
        replay: list[tuple[int, list[dict]]],
    ):
        cfg = self.cfg
        pending = deque(replay)
        rejected_since_last_step = 0
        last_saved = self.step
        progress = ProgressBar(cfg.trainer.total_training_steps, self.step, cfg.trainer.progress_bar)
        try:
            while self.step < cfg.trainer.total_training_steps:
                wait_start = time.perf_counter()
                if pending:
                    batch_id, raw_groups = pending.popleft()
                else:
                    raw_groups = await self._fetch(client, envs)
                    batch_id = spool.record(raw_groups)
                step_start = time.perf_counter()
                validated = validate_batch(raw_groups, self.step + 1, limits)
                rejected_since_last_step += len(validated.rejected)
                self.groups_rejected_total += len(validated.rejected)
                if not validated.groups:
                    logger.warning("every group of the batch was rejected; waiting for the next batch")
                    spool.mark_trained(batch_id, self.step)
                    continue

                advantages, advantage_stats = token_advantages(validated.groups, cfg.advantage)
                batch, batch_stats = build_batch(
                    validated.groups,
                    advantages,
                    reduction=cfg.loss.reduction,
                    use_sampling_temperature=cfg.loss.use_sampling_temperature,
                    pad_to_multiple=actor.batch_multiple,
                )
                if service is not None:
                    await service.before_training()
                train_start = time.perf_counter()
                train_metrics = await asyncio.to_thread(actor.train, batch)
                train_s = time.perf_counter() - train_start
                self.step += 1
                self.groups_trained_total += len(validated.groups)
                spool.mark_trained(batch_id, self.step)
                # A re-registration after an API restart must resume the API's step count here.
                client.registration = dataclasses.replace(client.registration, starting_step=self.step)
                if service is not None:
                    report = await service.sync(self.step, probe=sync_probe(validated.groups, cfg))
                    train_metrics.update(report.as_metrics())

                metrics = {
                    **train_metrics,
                    **reward_metrics(validated.groups),
                    **advantage_stats.as_metrics(),
                    **batch_stats.as_metrics(),
                    "data/groups": len(validated.groups),
                    "data/groups_rejected": rejected_since_last_step,
                    "data/groups_rejected_total": self.groups_rejected_total,
                    "timing/wait_s": step_start - wait_start,
                    "timing/train_s": train_s,
                    "timing/step_s": time.perf_counter() - step_start,
                    "perf/tokens_per_s": batch_stats.num_tokens / max(train_s, 1e-9),
                }
                rejected_since_last_step = 0
                metrics_logger.log(self.step, metrics)
                progress.update(metrics, (await client.status()).queue_size if cfg.trainer.progress_bar else None)
                logger.info(
                    "step %d/%d loss %.4f reward %.3f adv %.3f groups %d rejected %d (%.2fs)",
                    self.step,
                    cfg.trainer.total_training_steps,
                    metrics["train/loss"],
                    metrics["reward/mean"],
                    metrics["advantage/mean"],
                    metrics["data/groups"],
                    metrics["data/groups_rejected"],
                    metrics["timing/step_s"],
                )
                if cfg.trainer.save_freq and self.step % cfg.trainer.save_freq == 0:
                    await asyncio.to_thread(self._save, actor)
                    spool.checkpoint_committed(self.step)
                    last_saved = self.step
        finally:
            progress.close()
        if last_saved != self.step:
            await asyncio.to_thread(self._save, actor)
            spool.checkpoint_committed(self.step)
