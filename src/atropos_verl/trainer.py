"""The training loop: Atropos batch → validated groups → advantages → verl update → weight sync → metrics.

:meth:`Trainer.run` starts what the run needs and :meth:`Trainer._train` is the loop;
each stage lives in its own module:

    atropos.batches     the next batch: spooled ones a crash left untrained, then the API's
    groups              validate every group; reject bad ones with a reason
    staleness           which policy version sampled each group; trainer.max_staleness
    advantages          per-token advantages (env-given, or from scores)
    batch               pack into verl's no-padding TensorDict (shifted layout)
    policy.actor        verl FSDP2 workers run the advantage-weighted token loss
    serving.service     (engine=vllm|sglang) replicas + gateway; weights synced and proven after each step
    checkpoint          verl's checkpoint plus the loop's progress record
    metrics, report     metrics.jsonl + verl Tracking; progress bar, summary, curves
    atropos.environments  the Atropos API and the supervised environments, when the run starts them
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import ray

from atropos_verl.advantages import token_advantages
from atropos_verl.assets import resolve_model_path
from atropos_verl.atropos.batches import BatchSource
from atropos_verl.atropos.client import AtroposClient, TrainerRegistration
from atropos_verl.atropos.environments import (
    EnvironmentFailedError,
    EnvLaunch,
    EnvSupervisor,
    api_address,
    ensure_api,
)
from atropos_verl.atropos.front import FrontCounters, TrajectoryFront
from atropos_verl.batch import build_batch
from atropos_verl.checkpoint import CheckpointDir, Progress, find_checkpoint, run_dir_lock
from atropos_verl.config import RunConfig, check_device, compute_dtype
from atropos_verl.groups import GroupLimits, ScoredGroup, validate_batch
from atropos_verl.metrics import MetricsLogger, env_group_counts, reward_metrics
from atropos_verl.modelinfo import model_info
from atropos_verl.placement import Placement, node_placement
from atropos_verl.policy.actor import Actor, ensure_ray, resolve_device
from atropos_verl.ray_nodes import check_cluster_resources, placed_processes
from atropos_verl.report import ProgressBar, finish
from atropos_verl.serving.service import InferenceService, NoServing, serving_for
from atropos_verl.spool import GroupSpool
from atropos_verl.staleness import Lineage, StalenessReport, bound_staleness
from atropos_verl.stopping import StopSignals, finish_in_thread

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir).resolve()
        self.checkpoints = CheckpointDir(self.run_dir / "checkpoints", cfg.trainer.max_ckpt_to_keep)
        # Where a resumed run's checkpoint is: this run's own, or trainer.resume_from's.
        self.resume_source = self.checkpoints
        self.progress = Progress()
        # SIGTERM, SIGINT and SIGHUP cancel run(); train.py exits with signals.exit_code.
        self.signals = StopSignals()

    async def run(self) -> Path:
        cfg = self.cfg
        self.signals.install()
        device = resolve_device(cfg.trainer.device)
        check_device(cfg, device)
        # Before anything starts: more GPUs asked for than visible fails here, not inside verl.
        placement = node_placement(cfg.trainer, cfg.engine, device)
        if placed_processes(cfg):
            # Replicas and environments placed on the cluster's nodes start before the policy's
            # workers do: join it now, and fail here when no node has what one asks for.
            ensure_ray(cfg, device, placement)
            self.signals.reinstall()
            check_cluster_resources(cfg, ray.nodes())
        started_at = time.monotonic()
        _warn_uncorrected_external(cfg)
        model_path = resolve_model_path(cfg.model.path)
        limits = GroupLimits(
            vocab_size=model_info(model_path, cfg.model.trust_remote_code).vocab_size,
            max_token_len=cfg.trainer.max_token_len,
        )
        resume_step = self._resume_point()
        # Before anything starts: a missing environment script fails the run in seconds.
        envs = EnvSupervisor(cfg.data, self.run_dir / "envs")
        try:
            await self._run(model_path, device, limits, resume_step, envs, placement)
        except asyncio.CancelledError:
            # An environment that cannot start cancels the run (see EnvSupervisor): say which.
            if envs.failure is not None and self.signals.received is None:
                raise EnvironmentFailedError(envs.failure) from None
            raise
        finish(self.run_dir, started_at)
        return self.run_dir

    async def _run(
        self,
        model_path: str,
        device: str,
        limits: GroupLimits,
        resume_step: Optional[int],
        envs: EnvSupervisor,
        placement: Placement,
    ) -> None:
        """Start what the run needs (stopped again in reverse order, whatever happens), then train."""
        cfg = self.cfg
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(run_dir_lock(self.run_dir))
            metrics_logger = stack.enter_context(contextlib.closing(self._metrics_logger()))
            spool = stack.enter_context(contextlib.closing(self._spool()))
            replay = spool.start_attempt(resume_step or 0)
            if replay:
                logger.info("replaying %d fetched batches that no checkpoint includes", len(replay))
            api = await ensure_api(cfg.atropos, self.run_dir / "logs")
            front = None
            if api is not None:
                stack.callback(api.stop)
                host, port = api_address(cfg.atropos)
                front = await stack.enter_async_context(TrajectoryFront(api.url, host, port, cfg.trainer.batch_size))
            api_url = front.url if front is not None else cfg.atropos.api_url
            serving = serving_for(
                cfg.engine, cfg.model, model_path, compute_dtype(cfg.actor, device), self.run_dir, placement
            )
            stack.push_async_callback(serving.stop)
            stack.push_async_callback(envs.stop)
            client = await stack.enter_async_context(self._client(api_url))
            # Fail fast on an unreachable API before spending time on workers and engines.
            await client.wait_until_reachable()
            await serving.start_gateway()
            # Environments load while the workers and replicas start; they wait for the
            # trainer's registration (and the gateway for replicas) on their own.
            gateway = (serving.url, serving.model_name) if serving.url is not None else None
            envs.start(
                api_url,
                model_path,
                gateway,
                serving.api_key,
                launch=EnvLaunch.for_run(cfg.trainer, cfg.data.group_size),
            )
            policy = await self._start_policy(model_path, placement, serving)
            stack.callback(policy.shutdown)
            # Runs before the workers stop: the weight transport holds buffers inside them.
            stack.push_async_callback(serving.detach)
            if resume_step is not None:
                await finish_in_thread(policy.load_checkpoint, str(self.resume_source.actor_dir(resume_step)))
                logger.info("resumed from %s at step %d", self.resume_source.step_dir(resume_step), self.progress.step)
            await serving.attach(policy, self.progress.step, resumed=resume_step is not None)
            await client.register()
            source = BatchSource(
                client,
                spool,
                replay,
                envs,
                cfg.atropos.batch_timeout,
                cfg.atropos.max_poll_interval,
                api=api,
                env_log_dir=envs.log_dir,
                starvation_hint_after_s=cfg.atropos.starvation_hint_after,
            )
            await self._train(source, front, policy, serving, limits, metrics_logger)

    async def _train(
        self,
        source: BatchSource,
        front: Optional[TrajectoryFront],
        policy: Actor,
        serving: InferenceService | NoServing,
        limits: GroupLimits,
        metrics_logger: MetricsLogger,
    ) -> None:
        cfg, progress = self.cfg, self.progress
        last_saved, kept_out = progress.step, KeptOut()
        with contextlib.closing(
            ProgressBar(cfg.trainer.total_training_steps, progress.step, cfg.trainer.progress_bar)
        ) as bar:
            while progress.step < cfg.trainer.total_training_steps:
                wait_start = time.perf_counter()
                batch_id, raw_groups = await source.next()
                step_start = time.perf_counter()
                groups, staleness = self._admit(raw_groups, serving.lineage, limits, kept_out)
                if not groups:
                    logger.warning("every group of the batch was rejected or too stale; waiting for the next batch")
                    source.done(batch_id, progress.step)
                    continue

                advantages, advantage_stats = token_advantages(groups, cfg.advantage)
                batch, batch_stats = build_batch(
                    groups,
                    advantages,
                    reduction=cfg.loss.reduction,
                    use_sampling_temperature=cfg.loss.use_sampling_temperature,
                    pad_to_multiple=policy.batch_multiple,
                    reference_log_probs=bool(cfg.loss.ref_model),
                )
                await serving.before_training()
                train_start = time.perf_counter()
                train_metrics = await finish_in_thread(policy.train, batch)
                train_s = time.perf_counter() - train_start
                progress.step += 1
                progress.groups_trained_total += len(groups)
                source.done(batch_id, progress.step)
                sync_metrics = await serving.after_training(progress.step, [t for g in groups for t in g.tokens])

                # Groups the front refused when they were posted count as rejected too.
                kept_out.refused = front.take_counters() if front is not None else FrontCounters()
                kept_out.rejected += kept_out.refused.rejected
                progress.groups_rejected_total += kept_out.refused.rejected
                stages = [train_metrics, sync_metrics, advantage_stats.as_metrics(), batch_stats.as_metrics()]
                timing = {
                    "timing/wait_s": step_start - wait_start,
                    "timing/train_s": train_s,
                    "timing/step_s": time.perf_counter() - step_start,
                    "perf/tokens_per_s": batch_stats.num_tokens / max(train_s, 1e-9),
                }
                metrics = step_metrics(groups, stages, staleness, kept_out, progress, source, timing)
                kept_out = KeptOut()
                metrics_logger.log(progress.step, metrics)
                bar.update(metrics, (await source.client.status()).queue_size if cfg.trainer.progress_bar else None)
                _log_step(progress.step, cfg.trainer.total_training_steps, metrics)
                if cfg.trainer.save_freq and progress.step % cfg.trainer.save_freq == 0:
                    await self._save(policy, source)
                    last_saved = progress.step
        if last_saved != progress.step:
            await self._save(policy, source)

    def _admit(
        self, raw_groups: list, lineage: Optional[Lineage], limits: GroupLimits, kept_out: KeptOut
    ) -> tuple[list[ScoredGroup], StalenessReport]:
        """The batch's groups that pass the trainer's checks and trainer.max_staleness; the others are counted."""
        progress, t = self.progress, self.cfg.trainer
        validated = validate_batch(raw_groups, progress.step + 1, limits)
        kept_out.rejected += len(validated.rejected)
        progress.groups_rejected_total += len(validated.rejected)
        fresh, staleness = bound_staleness(validated.groups, lineage, progress.step, t.max_staleness, t.stale_groups)
        kept_out.stale += staleness.dropped
        progress.groups_stale_total += len(staleness.dropped)
        return fresh, staleness

    def _resume_point(self) -> Optional[int]:
        """Restore the loop's progress from the checkpoint to resume; weights are loaded once workers exist.

        This run's own latest checkpoint wins over ``trainer.resume_from``, so re-running a command
        that started from another run's checkpoint continues this one.
        """
        t = self.cfg.trainer
        latest = self.checkpoints.latest_step() if t.resume == "auto" else None
        if latest is None and t.resume_from:
            self.resume_source, latest = find_checkpoint(Path(t.resume_from))
        if latest is not None:
            self.progress = self.resume_source.load_progress(latest)
        return latest

    def _metrics_logger(self) -> MetricsLogger:
        t = self.cfg.trainer
        backends = [b for b in t.logger if b != "file"]
        return MetricsLogger(
            self.run_dir, t.project_name, t.experiment_name, backends, config=dataclasses.asdict(self.cfg)
        )

    def _spool(self) -> GroupSpool:
        if self.cfg.trainer.resume == "disable":
            # A fresh start owes nothing to batches an earlier run in this folder fetched.
            for leftover in self.run_dir.glob("spool.sqlite*"):
                leftover.unlink()
        return GroupSpool(self.run_dir / "spool.sqlite")

    def _client(self, api_url: str) -> AtroposClient:
        a, t = self.cfg.atropos, self.cfg.trainer
        registration = TrainerRegistration(
            wandb_group=a.wandb_group,
            wandb_project=a.wandb_project,
            batch_size=t.batch_size,
            max_token_len=t.max_token_len,
            checkpoint_dir=str(self.checkpoints.root),
            save_checkpoint_interval=t.save_freq,
            starting_step=self.progress.step,
            num_steps=t.total_training_steps,
        )
        return AtroposClient(
            api_url=api_url,
            registration=registration,
            request_timeout_s=a.request_timeout,
            connect_deadline_s=a.timeout,
            poll_interval_s=a.poll_interval,
            max_poll_interval_s=a.max_poll_interval,
            max_retries=a.max_retries,
            reset_on_mismatch=a.reset_on_mismatch,
        )

    async def _start_policy(
        self, model_path: str, placement: Placement, serving: InferenceService | NoServing
    ) -> Actor:
        """Start the policy workers and, concurrently, the inference replicas (both take a while)."""
        constructing = asyncio.ensure_future(
            asyncio.to_thread(Actor, self.cfg, model_path, placement, on_ray_started=self.signals.reinstall)
        )
        try:
            results = await asyncio.gather(
                asyncio.shield(constructing), serving.start_replicas(), return_exceptions=True
            )
        except asyncio.CancelledError:
            # The constructor's thread cannot be interrupted; what it builds must still be stopped.
            await asyncio.wait([constructing])
            if not constructing.cancelled() and constructing.exception() is None:
                await asyncio.to_thread(constructing.result().shutdown)
            raise
        actor = results[0]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            if isinstance(actor, Actor):
                actor.shutdown()
            raise failure
        return actor

    async def _save(self, policy: Actor, source: BatchSource) -> None:
        step = self.progress.step
        await finish_in_thread(policy.save_checkpoint, str(self.checkpoints.actor_dir(step)), step)
        await finish_in_thread(self.checkpoints.commit, dataclasses.replace(self.progress))
        source.checkpoint_committed(step)
        logger.info("checkpoint saved at step %d: %s", step, self.checkpoints.step_dir(step))


@dataclass
class KeptOut:
    """Groups kept out of training since the last step (the loop starts a new record after each step)."""

    # By the trainer's checks, and by the front when they were posted.
    rejected: int = 0
    # The staleness of each group trainer.max_staleness dropped.
    stale: list[int] = field(default_factory=list)
    refused: FrontCounters = field(default_factory=FrontCounters)


def step_metrics(
    groups: list[ScoredGroup],
    stages: list[dict[str, float]],
    staleness: StalenessReport,
    kept_out: KeptOut,
    progress: Progress,
    source: BatchSource,
    timing: dict[str, float],
) -> dict[str, float]:
    """One step's metrics: the stages' own, the trained groups', the API's and environments', what was kept out."""
    return {
        **{name: value for stage in stages for name, value in stage.items()},
        **reward_metrics(groups),
        **env_group_counts(groups),
        **source.client.counters(),
        **source.envs.evals.new_metrics(),
        **staleness.as_metrics(),
        "staleness/groups_dropped": len(kept_out.stale),
        **({"staleness/dropped_min": min(kept_out.stale)} if kept_out.stale else {}),
        "staleness/groups_dropped_total": progress.groups_stale_total,
        "data/groups": len(groups),
        "data/groups_rejected": kept_out.rejected,
        "data/groups_rejected_total": progress.groups_rejected_total,
        "data/groups_refused_at_api": kept_out.refused.rejected,
        "data/batches_served_again": kept_out.refused.batches_served_again,
        **timing,
    }


def _warn_uncorrected_external(cfg: RunConfig) -> None:
    """engine=external: the trainer never updates the sampler, so every step trains on older data."""
    if cfg.engine.kind == "external" and not cfg.rollout_correction.enabled and cfg.loss.clip_ratio is None:
        logger.warning(
            "engine=external: the trainer cannot update the environments' inference servers, so their samples "
            "come from a policy that falls further behind every step, and no off-policy correction is on; set "
            "rollout_correction.rollout_is=token (or loss.clip_ratio) unless those servers load the trainer's "
            "checkpoints themselves"
        )


def _log_step(step: int, total: int, metrics: dict[str, float]) -> None:
    logger.info(
        "step %d/%d loss %.4f reward %.3f adv %.3f groups %d rejected %d (%.2fs)",
        step,
        total,
        metrics["train/loss"],
        metrics["reward/mean"],
        metrics["advantage/mean"],
        metrics["data/groups"],
        metrics["data/groups_rejected"],
        metrics["timing/step_s"],
    )
