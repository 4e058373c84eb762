"""`--dtype auto` and `--moe-backend auto`, chosen by measurement once per deployment (issue #15).

Calibration times, at the model's shapes and with the caller's torch thread count, for each
candidate dtype and each token bucket B in BUCKETS:
- one routed MoE layer: random weights in an `ExpertStack`, random top-K routing of B tokens,
  the (token, expert) pairs sorted by expert, `experts.run_experts`, once per candidate backend
  (loop, sparse, grouped, bmm, weight-major, native, each where `check_supported` allows it;
  never `reference`);
- one dense matmul [B, hidden] @ [hidden, intermediate_size] (attention and the dense layers).
`native` also runs the step's linears (at most native.LINEAR_ROWS tokens in bf16, F32_LINEAR_ROWS in fp32),
so its MoE time is charged the difference they make: the dense matmul through native.linear against torch. (A plan with
`native` at any count also runs every single-token decode attention in place, at every count:
attention.MLA.attend; that is the plan's, not a bucket's, so no bucket is charged for it.)
Each trial is warmed up once, then repeated until REPEATS runs or TRIAL_BUDGET_S, and stopped as
soon as it is GIVE_UP× slower than the best backend so far in its bucket; the whole calibration
stops measuring after CALIBRATION_BUDGET_S (a busy machine) and decides on what it measured.

Result: the dtype whose summed best times are lowest, and per bucket the fastest backend, merged
into a `MoEPlan` (adjacent equal buckets merged; one backend if it wins everywhere). Candidate
dtypes: the checkpoint's (FP8 checkpoints dequantize to it) and fp32; an fp32 checkpoint is never
computed in a 16-bit dtype, and an explicit `--dtype` is kept as given.

Real DeepSeek-V3 shapes (256 experts x 7168 x 2048) are not allocated whole: the calibration stack
holds as many experts as fit in CALIBRATION_BYTES at fp32, but at least top-K (so DeepSeek-V3
times 8 experts, ~1.4 GB at fp32), the same count for every dtype, and the B tokens are routed over
those; the dense weight is cut to CALIBRATION_BYTES too.

The result is cached as JSON under $STREAMOE_HOME/numerics/, keyed by the machine (CPU model and
flags, or the CUDA device), torch version, device, shapes, thread count and the flags asked for.
A deployment agrees through Redis (`agree`): the first worker to calibrate publishes with SET NX.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.launcher.cliargs import FlagValueError
from shared.launcher.cliargs import home as streamoe_home  # (resolve takes a `home` of its own)
from shared.model import native
from shared.model.config import ModelArgs
from shared.model.experts import ExpertStack, MoEPlan, check_supported, expert_counts, run_experts
from shared.protocol import streams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # config.json -> flag
BUCKETS = (1, 4, 16, 64, 256)  # tokens per step: decode batches up to chunked prefills
TIMED_BACKENDS = ("loop", "sparse", "grouped", "bmm", "weight-major", "native")
CALIBRATION_BYTES = 256 << 20
NEAR_TIE = 1.1  # a bucket keeps the backend below it when that is within 10% of the fastest (noise)
GIVE_UP = 3.0  # a trial this many times slower than its bucket's best so far cannot win: stop it
REPEATS = 3
TRIAL_BUDGET_S = 0.1  # stop repeating a trial that has run this long (its best is known well enough)
# NOTE: on a busy machine every op can wait for a core; past this the calibration stops measuring and
# decides on what it has (the buckets measured so far; the first dtype when the second is unfinished)
CALIBRATION_BUDGET_S = 20.0
MOE_BACKEND_HELP = ("routed experts: auto (calibrated: the fastest per tokens per step), loop, sparse, grouped, bmm, "
                    "weight-major, native (CPU bf16 or fp32), reference, or a plan, e.g. 1:native,16:weight-major")
LOCK_TTL_MS = 120_000  # a worker that dies calibrating holds the others up this long at most
log = logging.getLogger("streamoe.numerics")


def moe_backend_flag(text: str) -> str:
    """--moe-backend's type: `auto`, a backend, or a plan (`1:loop,16:weight-major`), canonical."""
    if text.strip() == "auto":
        return "auto"
    try:
        return MoEPlan.parse(text).text
    except ValueError as e:
        raise FlagValueError(str(e).removeprefix("--moe-backend=")) from None


@dataclass(frozen=True)
class Shapes:
    """What calibration times, from config.json."""

    hidden: int
    moe_inter: int
    experts: int
    top_k: int
    dense_inter: int
    checkpoint_dtype: str  # "bfloat16" | "float32" | "float16"

    @classmethod
    def of(cls, args: ModelArgs) -> Shapes:
        return cls(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts, args.num_experts_per_tok,
                   args.intermediate_size, args.dtype)

    @classmethod
    def of_model(cls, model_dir: Path) -> Shapes:
        return cls.of(ModelArgs.from_file(Path(model_dir) / "config.json"))

    @property
    def slots(self) -> int:
        """Experts in the calibration stack: all that fit in CALIBRATION_BYTES at fp32, >= top-K."""
        per_expert = 3 * self.hidden * self.moe_inter * 4
        return min(self.experts, max(self.top_k, CALIBRATION_BYTES // per_expert))


@dataclass(frozen=True)
class Numerics:
    """What a deployment computes with: dtype (fp32|bf16|fp16), the MoE plan's text, and where it
    came from: measured here, cached (a file or the deployment's published value), or the flags."""

    dtype: str
    moe_backend: str
    source: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def published(self) -> str:
        return json.dumps({"dtype": self.dtype, "moe_backend": self.moe_backend})

    @classmethod
    def from_published(cls, raw: str | bytes, source: str = "cached") -> Numerics:
        value = json.loads(raw)
        return cls(value["dtype"], MoEPlan.parse(value["moe_backend"]).text, source)

    def health(self) -> dict[str, str]:
        """The fields a worker's /health shows."""
        return {"dtype": self.dtype, "moe_backend": self.moe_backend, "calibration": self.source}

    def fits(self, dtype: str, moe_backend: str) -> bool:
        """Whether these values agree with the flags (`auto` agrees with anything)."""
        return dtype in ("auto", self.dtype) and moe_backend in ("auto", self.moe_backend)


def candidate_dtypes(dtype: str, shapes: Shapes) -> list[str]:
    """An explicit dtype as given; auto: the checkpoint's, then fp32 (an fp32 checkpoint: fp32 only)."""
    if dtype != "auto":
        return [dtype]
    stored = CHECKPOINT_DTYPES[shapes.checkpoint_dtype]
    return [stored] if stored == "fp32" else [stored, "fp32"]


def machine_id(device: str | torch.device) -> str:
    """The hardware a measurement holds for: the CUDA device's name, or the CPU's model and flags."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda|{torch.cuda.get_device_name(device)}|{torch.cuda.get_device_capability(device)}"
    return f"{device.type}|{native.cpu_id()}"


# Raised when a backend's kernels change (a cached choice was measured on the old ones).
KERNELS_VERSION = 11


def cache_key(machine: str, torch_version: str, device: str, shapes: Shapes, threads: int,
              dtype: str, moe_backend: str) -> str:
    """The local cache's key: every input that changes what calibration would choose."""
    blob = json.dumps({"machine": machine, "torch": torch_version, "device": str(device), "shapes": asdict(shapes),
                       "threads": threads, "dtype": dtype, "moe_backend": moe_backend,
                       "candidates": TIMED_BACKENDS, "buckets": BUCKETS,
                       "kernels": KERNELS_VERSION}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


@dataclass
class Timings:
    """Best seconds per bucket: moe[B][backend], dense[B]; `complete` False when cut short."""

    moe: dict[int, dict[str, float]]
    dense: dict[int, float]
    complete: bool = True

    def total(self, plan: MoEPlan | None = None) -> float:
        """Summed best times over the buckets (with `plan`: its backend in each bucket)."""
        if not self.complete:
            return math.inf
        moe = [min(t.values()) if plan is None else t.get(plan.choose(b), 0.0) for b, t in self.moe.items()]
        return sum(moe) + sum(self.dense.values())


Measure = Callable[[Shapes, torch.dtype, torch.device, list[str], float, float], Timings]


def measure(shapes: Shapes, dtype: torch.dtype, device: torch.device, backends: list[str],
            stop_after: float = math.inf, deadline: float = math.inf) -> Timings:
    """Time one MoE layer per backend and the dense matmul at each bucket; stops (incomplete) once
    the buckets done so far sum past `stop_after` seconds (another dtype already did better), or
    at `deadline` (time.monotonic()), keeping the buckets it finished."""
    slots = shapes.slots
    stack = ExpertStack.empty(slots, shapes.hidden, shapes.moe_inter, dtype, device)
    stack.w13.uniform_(-0.02, 0.02)  # small values: no overflow, no denormals
    stack.w2.uniform_(-0.02, 0.02)
    dense_cols = max(1, min(shapes.dense_inter, CALIBRATION_BYTES // (4 * shapes.hidden)))
    dense_w = torch.empty(dense_cols, shapes.hidden, dtype=dtype, device=device).uniform_(-0.02, 0.02)  # as nn.Linear's
    timings = Timings({}, {})
    top_k = min(shapes.top_k, slots)
    for tokens in BUCKETS:
        if timings.moe and time.monotonic() > deadline:  # the first bucket always: a plan needs one
            timings.complete = False
            break
        x = torch.randn(tokens, shapes.hidden, device=device).to(dtype)
        ids = torch.rand(tokens, slots, device=device).topk(top_k, dim=1).indices  # [B, K] distinct experts
        order = ids.flatten().argsort(stable=True)  # pairs sorted by expert
        xs = x[order // top_k].contiguous()  # pair p = t * K + k belongs to token t
        counts = expert_counts(ids, slots)
        timings.dense[tokens] = _best(lambda x=x: F.linear(x, dense_w), device)
        best = math.inf
        timings.moe[tokens] = {}
        for backend in backends:
            took = _best(lambda b=backend, xs=xs, counts=counts: run_experts(b, xs, counts, stack), device,
                         GIVE_UP * best, deadline)
            if backend == "native" and native.supports(x, dense_w):  # it runs the step's linears of as many rows
                took += _best(lambda x=x: native.linear(x, dense_w), device) - timings.dense[tokens]
            timings.moe[tokens][backend] = took
            best = min(best, took)
        if sum(min(t.values(), default=0.0) for t in timings.moe.values()) + sum(timings.dense.values()) > stop_after:
            timings.complete = False
            break
    return timings


def _best(fn: Callable[[], object], device: torch.device, give_up: float = math.inf,
          deadline: float = math.inf) -> float:
    with torch.inference_mode():
        fn()  # warm-up: the first call pays for kernel selection and weight reorders
        _sync(device)
        best, spent = math.inf, 0.0
        for _ in range(REPEATS):
            start = time.perf_counter()
            fn()
            _sync(device)
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
            if best > give_up or spent > TRIAL_BUDGET_S or time.monotonic() > deadline:
                break
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_of(timings: Timings) -> MoEPlan:
    """Per bucket the fastest backend (the one below it on a near tie); a bucket's backend starts
    halfway (geometrically) from the bucket below, and adjacent buckets with one winner merge."""
    steps: list[tuple[int, str]] = []
    previous = None
    for tokens, by_backend in sorted(timings.moe.items()):
        winner = min(by_backend, key=by_backend.get)
        if steps and by_backend.get(steps[-1][1], math.inf) <= NEAR_TIE * by_backend[winner]:
            winner = steps[-1][1]
        if steps and steps[-1][1] == winner:
            previous = tokens
            continue
        start = 1 if previous is None else max(previous + 1, round(math.sqrt(previous * tokens)))
        steps.append((start, winner))
        previous = tokens
    return MoEPlan(tuple(steps))


def can_run(plan: MoEPlan, device: torch.device, dtype: str) -> bool:
    try:
        check_supported(plan, device, DTYPES[dtype])
    except ValueError:
        return False
    return True


def calibrate(shapes: Shapes, device: torch.device, dtype: str, moe_backend: str,
              measure_fn: Measure = measure) -> tuple[Numerics, dict[str, Timings]]:
    """Measure every candidate dtype (and, with `moe_backend` auto, every backend): the choice and
    the timings by dtype. A later dtype stops early once it cannot beat the best one so far."""
    plan = None if moe_backend == "auto" else MoEPlan.parse(moe_backend)
    candidates = candidate_dtypes(dtype, shapes)
    if plan is not None:  # a dtype the plan cannot run is no candidate (none: refused, naming both)
        runnable = [name for name in candidates if can_run(plan, device, name)]
        if not runnable:
            check_supported(plan, device, DTYPES[candidates[0]])
        candidates = runnable
    results: dict[str, Timings] = {}
    best, chosen = math.inf, candidates[0]
    deadline = time.monotonic() + CALIBRATION_BUDGET_S
    for name in candidates:
        backends = [b for b in TIMED_BACKENDS if (b in plan.backends if plan is not None
                                                  else can_run(MoEPlan.single(b), device, name))]
        results[name] = measure_fn(shapes, DTYPES[name], device, backends, GIVE_UP * best, deadline)
        total = results[name].total(plan)
        if total < best:
            best, chosen = total, name
    if time.monotonic() > deadline:
        log.warning(json.dumps({"event": "numerics_cut_short", "budget_s": CALIBRATION_BUDGET_S,
                                "why": "the machine is busy: decided on the buckets and dtypes measured"}))
    return Numerics(chosen, (plan or plan_of(results[chosen])).text, "measured"), results


def resolve(shapes: Shapes, device: str | torch.device = "cpu", threads: int = 0, dtype: str = "auto",
            moe_backend: str = "auto", *, home: Path | None = None, measure_fn: Measure = measure,
            torch_version: str | None = None, machine: str | None = None) -> Numerics:
    """The dtype and MoE plan to compute with on this machine, with `threads` torch threads (0: the
    current count). Explicit values are kept (source `flag` when nothing is left to measure);
    otherwise the local cache answers (`cached`) or calibration runs (`measured`, then cached).
    `torch_version` and `machine` default to this process's: the cache key's inputs."""
    moe_backend = moe_backend_flag(moe_backend)
    if dtype not in (*DTYPES, "auto"):
        raise ValueError(f"--dtype={dtype!r}: expected auto, {', '.join(DTYPES)}")
    device = torch.device(device)
    dtypes = candidate_dtypes(dtype, shapes)
    if moe_backend != "auto" and len(dtypes) == 1:
        return Numerics(dtypes[0], moe_backend, "flag")
    threads = threads or torch.get_num_threads()
    key = cache_key(machine or machine_id(device), torch_version or torch.__version__, str(device), shapes, threads,
                    dtype, moe_backend)
    path = (home or streamoe_home()) / "numerics" / f"{key}.json"
    try:
        found = Numerics.from_published(path.read_text(), "cached")
        log.info(json.dumps({"event": "numerics", **found.health(), "file": str(path)}))
        return found
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not there (or unreadable): measure
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the workers' own count: what wins at 1 thread may lose at 16
    start = time.perf_counter()
    try:
        numerics, timings = calibrate(shapes, device, dtype, moe_backend, measure_fn)
    finally:
        torch.set_num_threads(before)
    seconds = round(time.perf_counter() - start, 3)
    record = {**json.loads(numerics.published()), "seconds": seconds, "threads": threads, "device": str(device),
              "timings": {name: dataclasses.asdict(t) for name, t in timings.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)  # atomic: a concurrent reader sees all or nothing
    log.info(json.dumps({"event": "numerics", **numerics.health(), "seconds": seconds, "file": str(path)}))
    return numerics


def weights_checksum(model_dir: Path) -> str:
    """The checkpoint's weight files' checksum (the per-file checksums the model fingerprint is
    made of, remembered under $STREAMOE_HOME/checksums): names the deployment's published numerics."""
    from shared.cache.hashing import model_fingerprint

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no safetensors files to checksum")
    return model_fingerprint(files, "weights", cache_dir=streamoe_home() / "checksums")


async def agree(redis, checksum: str, dtype: str, moe_backend: str, compute: Callable[[], Numerics],
                poll_s: float = 0.5) -> Numerics:
    """A worker's numerics, the same on every worker of a deployment (`checksum`: the checkpoint's
    weights_checksum): the value published in Redis when it fits the flags (source `cached`); else
    one worker at a time (a lock, so calibrations do not skew each other's timings) runs `compute()`
    off the event loop and publishes with SET NX, and each adopts whichever value won. Explicit
    flags win over a published value that disagrees (and leave it as it is)."""
    key, lock = streams.numerics_key(checksum), streams.numerics_lock_key(checksum)
    if dtype != "auto" and moe_backend != "auto":
        own = compute()
        await redis.set(key, own.published(), nx=True)  # a cache service left on auto follows it
        return own
    own, waited = None, False
    while (raw := await redis.get(key)) is None:
        if await redis.set(lock, "calibrating", nx=True, px=LOCK_TTL_MS):
            try:
                own = await asyncio.to_thread(compute)
                if await redis.set(key, own.published(), nx=True):
                    return own
            finally:
                await redis.delete(lock)
            continue  # another worker published first: adopt its value
        if not waited:
            log.info(json.dumps({"event": "numerics_wait", "key": key, "why": "another worker is calibrating"}))
            waited = True
        await asyncio.sleep(poll_s)
    published = Numerics.from_published(raw, "cached")
    if published.fits(dtype, moe_backend):
        log.info(json.dumps({"event": "numerics_adopted", **published.health(), "key": key}))
        return published
    log.warning(json.dumps({"event": "numerics_flags_win", "published": published.health(), "dtype": dtype,
                            "moe_backend": moe_backend, "key": key}))
    return own or await asyncio.to_thread(compute)


async def wait_published(redis, checksum: str, closing: asyncio.Event, poll_s: float = 1.0) -> Numerics | None:
    """The deployment's published numerics, polling (and logging that it waits) until a worker
    publishes them; None if `closing` is set first."""
    key = streams.numerics_key(checksum)
    polls = 0
    while not closing.is_set():
        raw = await redis.get(key)
        if raw is not None:
            return Numerics.from_published(raw, "cached")
        if polls % 30 == 0:
            log.info(json.dumps({"event": "numerics_wait", "key": key,
                                 "why": "--dtype auto: the workers' calibrated dtype keys the blocks"}))
        polls += 1
        try:
            await asyncio.wait_for(closing.wait(), poll_s)
        except TimeoutError:
            pass
    return None
