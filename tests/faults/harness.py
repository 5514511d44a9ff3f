"""Fault injection into real CPU runs of the whole system, and the figures the fault table reports.

Each scenario starts `python -m atropos_verl.train` (tiny model) with its environments,
injects one fault at a chosen step, lets the run finish and reports: whether it
survived (or stopped with a clear message), how many groups were lost, how many were
trained twice in the final model's lineage, and how long recovery took (from the fault
to the next training step).

Losses are counted end to end: the environments write down every group they posted
(tests/envs/ledger.py), the harness adds what it posted itself, and the balance is
posted = trained + rejected + still held by the API at the end (its queue and the batches it
has formed but not handed out, drained) (+ what an API took with it when the fault killed
it, read from the API just before). Trained and rejected
come from the metrics of each step of the final run (a step replayed after a resume
counts once). Double training is read from the spool's lineage.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from procs import REPO, base_overrides, cmdline, processes_with_marker, spawn, train_command

from atropos_verl.atropos import ApiServerProcess
from atropos_verl.metrics import read_metrics
from atropos_verl.netutil import free_port
from atropos_verl.spool import lineage

sys.path.insert(0, str(REPO / "tests" / "envs"))
from ledger import LEDGER_ENV, posted_groups  # noqa: E402

RUN_TIMEOUT_S = 720


@dataclass
class FaultResult:
    fault: str
    injected: int
    survived: bool
    groups_lost: int
    groups_double_trained: int
    recover_s: Optional[float]
    note: str = ""


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.exists() and path.stat().st_size else []


def _final_steps(run_dir: Path) -> list[dict]:
    """One record per step: a step trained again after a resume replaces the one the crash discarded."""
    return list({m["step"]: m for m in _steps(run_dir)}.values())


def _queued(api_url: str) -> int:
    """Groups waiting in run-api's queue (not those already formed into batches)."""
    with urllib.request.urlopen(f"{api_url}/status", timeout=10) as resp:
        return int(json.loads(resp.read())["queue_size"])


def _left_in_api(api_url: str) -> int:
    """Every group run-api still holds once the trainer is gone: it forms all the batches it can
    at once and hands them out one per ``/batch``, so those are drained and counted, then the rest
    of the queue (too few groups for a batch) is read."""
    drained = 0
    for _ in range(1000):
        with urllib.request.urlopen(f"{api_url}/batch", timeout=10) as resp:
            batch = json.loads(resp.read()).get("batch")
        if not batch:
            break
        drained += len(batch)
    return drained + _queued(api_url)


def _posted_before_reset(api_log: Path) -> int:
    """Groups a restarted run-api accepted before the trainer's ``/reset_data`` cleared its lock-out.

    Read from run-api's own access log: an environment that does not know the API restarted
    keeps posting, the first post locks the API out of ``/register``, and the only way back
    (``/reset_data``) drops what was queued.
    """
    lines = api_log.read_text().splitlines()
    resets = [i for i, line in enumerate(lines) if '"GET /reset_data' in line]
    if not resets:
        return 0
    return sum('"POST /scored_data HTTP/1.1" 200' in line for line in lines[: resets[-1]])


def _ledger(run_dir: Path) -> Path:
    return run_dir.parent / "posted.ledger"


def _run_with_fault(
    tmp: Path,
    name: str,
    overrides: list[str],
    inject_after_step: int,
    inject: Callable[[str], str],
    steps: int,
) -> tuple[int, str, Optional[float], str, Path]:
    """Run, call ``inject(marker)`` once ``inject_after_step`` is logged.

    Returns (exit code, log, recovery s, note, run dir).
    """
    run_dir = tmp / name / "run"
    marker = uuid.uuid4().hex
    log_path = tmp / name / "trainer.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = train_command(
        *overrides,
        f"trainer.total_training_steps={steps}",
        f"trainer.run_dir={run_dir}",
        f"hydra.run.dir={tmp / name / 'hydra'}",
    )
    trainer = spawn(cmd, log_path, marker, extra_env={LEDGER_ENV: str(_ledger(run_dir))})
    injected_at = recover_s = None
    note = ""
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while trainer.running and time.monotonic() < deadline:
            done = len(_steps(run_dir))
            if injected_at is None and done >= inject_after_step:
                note = inject(marker)
                injected_at, steps_at_injection = time.monotonic(), done
            elif injected_at is not None and recover_s is None and done > steps_at_injection:
                recover_s = time.monotonic() - injected_at
            time.sleep(0.2)
    finally:
        trainer.stop(timeout_s=60)
    return trainer.returncode(), log_path.read_text(), recover_s, note, run_dir


def _result(
    fault: str,
    injected: int,
    code: int,
    run_dir: Path,
    steps: int,
    recover_s,
    note: str,
    *,
    api_url: Optional[str],
    also_posted: int = 0,
    dropped_with_api: int = 0,
    dropped_by_reset: int = 0,
) -> FaultResult:
    """The run's end-to-end balance; ``api_url`` is the harness's own run-api, still up (None: the
    run's own API ended with it, and a group still queued there shows as lost)."""
    final = _final_steps(run_dir)
    done = len(final)
    posted = posted_groups(_ledger(run_dir)) + also_posted
    trained = int(sum(m["data/groups"] for m in final))
    rejected = int(sum(m["data/groups_rejected"] for m in final))
    queued = _left_in_api(api_url) if api_url is not None else 0
    balance = posted - trained - rejected - queued - dropped_with_api - dropped_by_reset
    spool = run_dir / "spool.sqlite"
    audit = lineage(spool) if spool.exists() else None
    note += f"; posted {posted} = trained {trained} + rejected {rejected} + queued {queued}"
    if dropped_with_api:
        note += f" + {dropped_with_api} in the killed API's memory"
    if dropped_by_reset:
        note += f" + {dropped_by_reset} dropped by the lock-out reset"
    if balance:
        note += f" ({balance:+d} unaccounted)"
    return FaultResult(
        fault=fault,
        injected=injected,
        survived=code == 0 and done == steps,
        groups_lost=max(balance, 0),
        groups_double_trained=audit.groups_double_trained if audit else -1,
        recover_s=recover_s,
        note=note,
    )


@contextlib.contextmanager
def _own_api(tmp: Path, name: str) -> Iterator[ApiServerProcess]:
    """A run-api the harness owns, so its queue can be read after the trainer is gone."""
    api = ApiServerProcess.start(port=free_port(), log_path=tmp / f"{name}-api.log")
    try:
        yield api
    finally:
        api.stop()


def scripted(api_port: int, extra: list[str] = (), env_args: str = "--env.pattern,score") -> list[str]:
    """The scripted environment sending identical score groups; a checkpoint every 2 steps."""
    return [
        *base_overrides(api_port, steps=1),
        "data=scripted",
        f"data.envs.0.args=[{env_args}]",
        "trainer.save_freq=2",
        *extra,
    ]


def api_restart(tmp: Path) -> FaultResult:
    """The Atropos API dies (all its state with it) and comes back on the same port."""
    port = free_port()
    holder = {"api": ApiServerProcess.start(port=port, log_path=tmp / "api-restart-api-1.log")}

    def inject(marker: str) -> str:
        # What the API takes with it is read while nothing posts or fetches: the environment and the
        # trainer's main process are frozen, and the API is given a moment to finish what it received.
        frozen = [
            p for p in processes_with_marker(marker)
            if "scripted_env.py" in cmdline(p) or "-m atropos_verl.train" in cmdline(p)
        ]  # fmt: skip
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.5)
            holder["dropped"] = _left_in_api(holder["api"].url)
            holder["api"].stop()
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        time.sleep(2.0)
        holder["api"] = ApiServerProcess.start(port=port, log_path=tmp / "api-restart-api-2.log")
        return "API stopped for 2 s and restarted empty"

    try:
        code, log, recover_s, note, run_dir = _run_with_fault(
            tmp, "api-restart", scripted(port, ["atropos.start_api=never"]), 2, inject, steps=6
        )
        note += "; trainer re-registered" if "Registering again" in log else "; no re-registration logged"
        return _result(
            "API restart", 1, code, run_dir, 6, recover_s, note,
            api_url=holder["api"].url, dropped_with_api=holder.get("dropped", 0),
            dropped_by_reset=_posted_before_reset(tmp / "api-restart-api-2.log"),
        )  # fmt: skip
    finally:
        holder["api"].stop()


# Groups the API accepts (its schema only checks types) but a trainer must not train on.
BAD_GROUPS = {
    "token id beyond the vocabulary": {"tokens": [[1, 2, 99999999]] * 4, "masks": [[-100, 2, 3]] * 4},
    "negative token id": {"tokens": [[1, -5, 3]] * 4, "masks": [[-100, -5, 3]] * 4},
    "masks shorter than tokens": {"tokens": [[1, 2, 3]] * 4, "masks": [[-100, 2]] * 4},
    "empty sequence": {"tokens": [[]] * 4, "masks": [[]] * 4},
    "every token masked": {"tokens": [[1, 2, 3]] * 4, "masks": [[-100, -100, -100]] * 4},
    "advantages of the wrong length": {
        "tokens": [[1, 2, 3]] * 4,
        "masks": [[-100, 2, 3]] * 4,
        "advantages": [[1.0]] * 4,
    },
    "sequence longer than max_token_len": {"tokens": [[5] * 300] * 4, "masks": [[5] * 300] * 4},
}


def _post(url: str, group: dict) -> None:
    body = json.dumps({"scores": [1.0, 0.0, 0.5, 0.25], **group}).encode()
    request = urllib.request.Request(f"{url}/scored_data", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10):
        pass


def bad_groups(tmp: Path) -> FaultResult:
    """Malformed groups posted through the real API between the environment's good ones."""
    port = free_port()
    api = ApiServerProcess.start(port=port, log_path=tmp / "bad-groups-api.log")

    def inject(marker: str) -> str:
        for group in BAD_GROUPS.values():
            _post(api.url, group)
        return f"{len(BAD_GROUPS)} malformed groups posted"

    try:
        code, log, recover_s, note, run_dir = _run_with_fault(
            # The env may run at most one batch ahead, so the bad groups are queued behind at most
            # two good batches and all reach the trainer within the run, however slow the machine.
            tmp,
            "bad-groups",
            scripted(port, ["atropos.start_api=never"], env_args="--env.pattern,score,--env.max_batches_offpolicy,1"),
            1,
            inject,
            steps=6,
        )
        rejected = _steps(run_dir)[-1].get("data/groups_rejected_total", 0) if _steps(run_dir) else 0
        result = _result(
            "bad groups", len(BAD_GROUPS), code, run_dir, 6, recover_s, note,
            api_url=api.url, also_posted=len(BAD_GROUPS),
        )  # fmt: skip
    finally:
        api.stop()
    result.note += f"; {rejected} rejected with a reason, training continued"
    result.survived = result.survived and rejected == len(BAD_GROUPS)
    return result


def _raw_group(env_id: int, size: int, score: str = "1.0", advantage: str | None = None) -> bytes:
    """A group as JSON text, so NaN and Infinity go out as the literals Python's json (run-api) accepts."""
    sequences = ", ".join(["[1, 2, 3]"] * size)
    masks = ", ".join(["[-100, 2, 3]"] * size)
    scores = ", ".join([score] + ["0.0"] * (size - 1))
    body = f'{{"tokens": [{sequences}], "masks": [{masks}], "scores": [{scores}], "env_id": {env_id}'
    if advantage is not None:
        body += ', "advantages": [' + ", ".join([f"[0.0, 0.0, {advantage}]"] + ["[0.0, 0.0, 0.0]"] * (size - 1)) + "]"
    return (body + "}").encode()


# Groups that stall or break run-api's queue itself (batch size 8): the front the trainer puts
# before its own run-api refuses them when they are posted.
QUEUE_HAZARDS = {
    "group larger than the batch": lambda env_id: _raw_group(env_id, 16),
    "group size not dividing the batch": lambda env_id: _raw_group(env_id, 3),
    "NaN score": lambda env_id: _raw_group(env_id, 4, score="NaN"),
    "infinite advantage": lambda env_id: _raw_group(env_id, 4, advantage="Infinity"),
}


def _raw_post(url: str, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError as err:  # nothing listens yet: the trainer is still starting its API
        return 0, {"error": str(err)}


def queue_hazards(tmp: Path) -> FaultResult:
    """Groups that would stall or break run-api's queue, posted to the trainer's own API between good
    ones. Counted end to end: the poster (this harness, registered as an environment) knows every good
    group it posted, and the trainer's per-environment group counts must add up to exactly those."""
    api_port, posted_good = free_port(), 8
    url = f"http://127.0.0.1:{api_port}"
    holder: dict = {}

    def inject(marker: str) -> str:
        registration = json.dumps(
            {"max_token_length": 256, "desired_name": "poster", "weight": 1.0, "group_size": 4}
        ).encode()
        status, answer = _raw_post(url, "/register-env", registration)
        deadline = time.monotonic() + 60
        while answer.get("status") != "success" and time.monotonic() < deadline:
            time.sleep(0.5)
            status, answer = _raw_post(url, "/register-env", registration)
        env_id = answer["env_id"]
        codes = []
        for i in range(posted_good):
            good = {
                "tokens": [[1, 10 + i, 20 + j, 30 + j] for j in range(4)],
                "masks": [[-100, 10 + i, 20 + j, 30 + j] for j in range(4)],
                "scores": [1.0, 0.0, 0.5, 0.25],
                "env_id": env_id,
            }
            codes.append(_raw_post(url, "/scored_data", json.dumps(good).encode())[0])
            hazard = list(QUEUE_HAZARDS.values())[i % len(QUEUE_HAZARDS)]
            codes.append(_raw_post(url, "/scored_data", hazard(env_id))[0])
        holder["env_id"], holder["codes"] = env_id, codes
        return f"{posted_good} good groups posted between {posted_good} that would stall or break run-api"

    overrides = [*base_overrides(api_port, steps=1), "atropos.start_api=always", "atropos.batch_timeout=120"]
    code, log, recover_s, note, run_dir = _run_with_fault(tmp, "queue-hazards", overrides, 0, inject, steps=4)
    steps = _steps(run_dir)
    trained = sum(m.get(f"data/groups_env_{holder.get('env_id')}", 0) for m in steps)
    refused = sum(m.get("data/groups_refused_at_api", 0) for m in steps)
    result = _result(
        "queue hazards", posted_good, code, run_dir, 4, recover_s, note, api_url=None, also_posted=2 * posted_good
    )
    result.groups_lost = max(result.groups_lost, posted_good - int(trained))
    result.note += f"; {refused} refused at the API with HTTP 400, {trained} good groups trained"
    result.survived = result.survived and refused == posted_good and holder.get("codes", [])[1::2] == [400] * 8
    return result


def env_crash(tmp: Path) -> FaultResult:
    """An environment process is killed (SIGKILL) mid-run."""

    def inject(marker: str) -> str:
        pids = [p for p in processes_with_marker(marker) if "scripted_env.py" in cmdline(p)]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return f"environment pid {pids} killed"

    with _own_api(tmp, "env-crash") as api:
        code, log, recover_s, note, run_dir = _run_with_fault(
            tmp,
            "env-crash",
            scripted(api.port, ["atropos.start_api=never"], "--env.pattern,score,--env.max_batches_offpolicy,1"),
            2,
            inject,
            steps=6,
        )
        note += "; restarted by the supervisor" if "restarted environment scripted[0]" in log else "; NOT restarted"
        return _result("environment crash", 1, code, run_dir, 6, recover_s, note, api_url=api.url)


def trainer_sigkill(tmp: Path) -> FaultResult:
    """The trainer's whole process group is SIGKILLed after step 3 (checkpoint at 2), then restarted."""

    def inject(marker: str) -> str:
        for pid in processes_with_marker(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return "trainer, Ray and environment SIGKILLed after step 3 (the API is the harness's)"

    with _own_api(tmp, "trainer-kill") as api:
        overrides = scripted(api.port, ["atropos.start_api=never"])
        code, _, _, note, run_dir = _run_with_fault(tmp, "trainer-kill", overrides, 3, inject, steps=6)
        killed_at = time.monotonic()
        # Same run directory: trainer.resume=auto continues from the checkpoint and replays the spool.
        code, log, _, _, _ = _run_with_fault(tmp, "trainer-kill", overrides, 10**6, lambda m: "", steps=6)
        recover_s = time.monotonic() - killed_at
        steps_after = sorted({m["step"] for m in _steps(run_dir)})
        # Step 3's batch, and the next one if it was fetched before the kill, are newer than the checkpoint.
        replayed = re.search(r"replaying (\d+) fetched batches", log)
        note += f"; resumed from step 2, replayed {replayed.group(1)} fetched batch(es)" if replayed else "; no replay"
        result = _result("trainer SIGKILL", 1, code, run_dir, 6, recover_s, note, api_url=api.url)
    result.survived = result.survived and steps_after == list(range(1, 7))
    return result


# What names an engine's server process (not its workers) on its command line.
_SERVER_MARKS = {"vllm": "vllm.entrypoints.openai.api_server", "sglang": "sglang_launcher/launch.py"}


def _replica_fault(
    tmp: Path, name: str, sig: signal.Signals, label: str, engine: str = "vllm", engine_args: list[str] = ()
) -> FaultResult:
    gateway_port = free_port()

    def inject(marker: str) -> str:
        servers = [p for p in processes_with_marker(marker) if _SERVER_MARKS[engine] in cmdline(p)]
        for pid in servers:
            os.kill(pid, sig)
        return f"{engine} server pid {servers} sent {sig.name}"

    with _own_api(tmp, name) as api:
        overrides = [
            *base_overrides(api.port, steps=1), "atropos.start_api=never",
            f"engine={engine}", "data=parity", "data.envs.0.args=[--env.max_batches_offpolicy,1]",
            "engine.dtype=float32", "engine.max_model_len=256", "engine.gpu_memory_utilization=0.4",
            f"engine.gateway_port={gateway_port}", "engine.health_interval=2", "engine.health_failures=2",
            *engine_args,
        ]  # fmt: skip
        code, log, recover_s, note, run_dir = _run_with_fault(tmp, name, overrides, 1, inject, steps=4)
        restarts = max((m.get("sync/replicas_restarted", 0) for m in _steps(run_dir)), default=0)
        note += f"; replica restarted {restarts}x and re-synced before serving"
        result = _result(label, 1, code, run_dir, 4, recover_s, note, api_url=api.url)
    result.survived = result.survived and restarts >= 1
    return result


def replica_crash(tmp: Path) -> FaultResult:
    """The vLLM replica's server process is SIGKILLed mid-run."""
    return _replica_fault(tmp, "replica-crash", signal.SIGKILL, "engine replica crash")


def replica_hang(tmp: Path) -> FaultResult:
    """The vLLM replica's server process is frozen (SIGSTOP): it stops answering."""
    return _replica_fault(tmp, "replica-hang", signal.SIGSTOP, "engine replica hang")


def sglang_replica_crash(tmp: Path, sglang_python: str) -> FaultResult:
    """The SGLang replica's server process is SIGKILLed mid-run (its scheduler children are left to the restart)."""
    return _replica_fault(
        tmp,
        "sglang-replica-crash",
        signal.SIGKILL,
        "SGLang replica crash",
        "sglang",
        [f"engine.python={sglang_python}"],
    )


SCENARIOS = {
    "api_restart": api_restart,
    "bad_groups": bad_groups,
    "queue_hazards": queue_hazards,
    "env_crash": env_crash,
    "trainer_sigkill": trainer_sigkill,
    "replica_crash": replica_crash,
    "replica_hang": replica_hang,
}


def table(results: list[FaultResult]) -> str:
    header = f"{'fault':<22} {'injected':>8} {'survived':>8} {'lost':>5} {'double':>6} {'recover':>8}  note"
    lines = [header, "-" * len(header)]
    for r in results:
        recover = "-" if r.recover_s is None else f"{r.recover_s:.1f}s"
        lines.append(
            f"{r.fault:<22} {r.injected:>8} {('yes' if r.survived else 'NO'):>8} {r.groups_lost:>5} "
            f"{r.groups_double_trained:>6} {recover:>8}  {r.note}"
        )
    return "\n".join(lines)
