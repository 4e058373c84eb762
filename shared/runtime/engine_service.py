"""What prefill and decode workers share: the engine on one compute thread (the "GPU stream"),
Redis I/O on the event loop, and load reports for the balancer."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from shared.cache.prefix_cache import PrefixCache
from shared.engine.engine import Engine, EngineConfig, SpecStats
from shared.engine.sequence import SamplingParams
from shared.ep.rank import EPRank
from shared.launcher.cliargs import (
    SPECULATIVE_TOKENS_HELP,
    FlagValueError,
    cpu_list_flag,
    resolve_speculative_tokens,
    speculative_tokens_flag,
)
from shared.model.loader import checkpoint_fingerprint, load_model
from shared.protocol import metric_names, streams
from shared.protocol.messages import Abort, LoadReport, Notice, Sampling
from shared.protocol.wire import encode
from shared.runtime import core_lease, notices, redis_client
from shared.runtime.core_lease import CoreLease, core_lease_flag
from shared.runtime.numerics import (
    MOE_BACKEND_HELP,
    Numerics,
    Shapes,
    agree,
    moe_backend_flag,
    resolve,
    weights_checksum,
)
from shared.runtime.omp import name_thread, serial_pool, serial_thread
from shared.runtime.service import Service, ServiceConfig

_STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


_GROUP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def group_id(text: str) -> str:
    """--ep-group-id: it names Redis keys and streams, so letters, digits, '_', '.', '-' only."""
    if not _GROUP_ID.fullmatch(text):
        raise FlagValueError(f"{text!r}: 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return text


# KEYS: a key; ARGV: the value it must hold to be deleted
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                        help="compute dtype; auto: the deployment's calibrated choice (shared/runtime/numerics.py)")
    parser.add_argument("--moe-backend", type=moe_backend_flag, default="auto", metavar="auto|BACKEND|PLAN",
                        help=MOE_BACKEND_HELP)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--speculative-tokens", type=speculative_tokens_flag, default="auto", metavar="N|auto",
                        help=SPECULATIVE_TOKENS_HELP + " (prefill never drafts: it computes the MTP layer's KV "
                        "for the handoff)")
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: a share of the cores)")
    parser.add_argument("--core-lease", type=core_lease_flag, default=None, metavar="PATH:SLOT",
                        help="compute each step on --threads plus the cores the machine's other workers leave "
                        "idle (a file of streamoe up --worker-threads lend; shared/runtime/core_lease.py)")
    parser.add_argument("--event-loop-cpus", type=cpu_list_flag, default=None, metavar="LIST",
                        help="once set up, run the event loop (Redis, HTTP, encoding) on these CPUs and leave the "
                        "CPUs this process started on to its steps (streamoe up --worker-cpus gives the others)")
    parser.add_argument("--core-lease-mode", choices=core_lease.MODES, default="lend",
                        help="lend: each step on the cores the others leave idle; turns: every core, the "
                        "workers taking them in turn, step by step (--worker-threads turns)")
    parser.add_argument("--load-ttl-s", type=float, default=5.0)
    parser.add_argument("--successor-of", default=None, metavar="INSTANCE",
                        help="the instance this one replaces while it still runs (a rolling restart): not "
                        "announced dead for the load report it leaves")
    parser.add_argument("--handover-timeout-s", type=float, default=10.0,
                        help="SIGTERM to the only rank of its role: it asks for a successor (a handover notice) "
                        "and serves on until one reports load, for at most this long; then it drains")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="the prefix cache's block store, shared with the cache service (omit: off)")
    parser.add_argument("--cache-capacity-mib", type=int, default=8192)
    parser.add_argument("--cache-write-delay-s", type=float, default=0.0,
                        help="fault injection: each block write first waits this long (a slow shared filesystem)")
    ep = parser.add_argument_group("expert parallelism")
    ep.add_argument("--ep-wire", default="fp8", choices=["fp8", "exact"],
                    help="fp8: FP8 dispatch (one scale per 128 channels), BF16 combine; exact: compute dtype")
    ep.add_argument("--num-redundant-experts", type=int, default=0, help="extra expert slots per MoE layer")
    ep.add_argument("--ep-timeout-s", type=float, default=30.0, help="a rank silent this long fails the exchange")
    ep.add_argument("--rank-dead-after-s", type=float, default=1.5,
                    help="a rank of the group that renews its alive key no more for this long (a frozen or "
                    "hung process) is cut out of the group; it renews every third of it")
    ep.add_argument("--ep-group-id", type=group_id, default=None,
                    help="this rank's EP group, for several EP groups of one role on one Redis (default: the role)")
    ep.add_argument("--ep-join-timeout-s", type=float, default=300.0, help="how long to wait for every rank")
    ep.add_argument("--overlap", choices=["on", "off", "auto"], default="auto",
                    help="two overlapped micro-batches per step (auto: on for prefill, off for decode)")
    ep.add_argument("--trace", type=Path, default=None, help="write this rank's stage timeline (Chrome trace JSON)")


def sampling_params(s: Sampling, first_index: int = 0) -> SamplingParams:
    """The engine's parameters from the wire's (the gateway already applied the defaults);
    `first_index`: a resumed request's (TokenizedRequest.resumed)."""
    return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                          seed=s.seed, stop_token_ids=tuple(s.stop_token_ids or ()), ignore_eos=s.ignore_eos,
                          first_index=first_index)


class EngineService(EPRank, Service):
    role = "worker"

    def raw_deltas(self, request_id: str) -> str:
        """The deltas stream of a request's partition (the tokenizer reads them all)."""
        return streams.raw_deltas_stream(self.config.partition(request_id))

    def __init__(self, config: ServiceConfig, args: argparse.Namespace, numerics: Numerics | None = None):
        """`numerics`: resolved by engine_main (the deployment's); None: resolved here, locally."""
        super().__init__(config)
        if not 0 <= args.rank < args.ep_size:
            raise SystemExit(f"--rank={args.rank}: outside the EP group of --ep-size={args.ep_size}")
        # tensors never run on the loop: one compute thread (the "GPU stream") loads, calibrates and steps, on
        # the CPUs this process started on, whatever the event loop's (--event-loop-cpus); every other thread
        # is serial, so the process holds one OpenMP team (shared/runtime/omp.py)
        self.compute_pool = compute_pool(engine_threads(args))
        serial_thread()
        self.numerics = numerics or self.compute_pool.submit(
            resolve, Shapes.of_model(args.model), args.device, engine_threads(args), args.dtype,
            args.moe_backend).result()
        # the concrete values from here on (load_ep reads args.dtype), in a copy: the caller's stays as given
        args = argparse.Namespace(**{**vars(args), "dtype": self.numerics.dtype,
                                     "moe_backend": self.numerics.moe_backend})
        self.args = args
        self.rank = args.rank
        self.group_id = args.ep_group_id or self.role
        self.load_key = streams.load_key(self.role, self.group_id, self.rank)
        # every worker metric: two "rank 0"s of different groups (e.g. the autoscaler's groups of one) differ
        self.metric_labels = {"role": self.role, "group": self.group_id, "rank": str(self.rank)}
        self.engine = self.compute_pool.submit(self.build_engine, args).result()
        model = self.engine.model
        self.num_kv_layers = model.args.num_kv_layers  # the MTP layer's included: a handoff's chunks
        self.core_lease = (None if args.core_lease is None else
                           CoreLease(*args.core_lease, available_cores(), engine_threads(args),
                                     args.core_lease_mode))
        self._last_report = 0.0
        self._withdrawn = False  # draining: the load report is gone, none is written again
        self.handing_over = False  # SIGTERM to the only rank of its role: serving on until a successor does
        self.aborted: deque[str] = deque(maxlen=4096)  # recent aborts, for handoffs that arrive late
        labels = self.metric_labels
        Gauge("streamoe_numerics_info", "The dtype and MoE plan this rank computes with, and where they came "
              "from (measured, cached, flag)", ["dtype", "moe_backend", "source"], registry=self.registry).labels(
            self.numerics.dtype, self.numerics.moe_backend, self.numerics.source).set(1)
        self.kv_used = Gauge("streamoe_kv_blocks_used", "KV blocks in use (reserved included)", list(labels),
                             registry=self.registry).labels(**labels)
        self.handovers = Counter("streamoe_handovers", "SIGTERMs to the only rank of its role that asked for a "
                                 "successor and served on until it came (a handover notice)", list(labels),
                                 registry=self.registry).labels(**labels)
        self.aborts_done = Counter("streamoe_requests_aborted_total", "Running requests aborted on this rank",
                                   list(labels), registry=self.registry).labels(**labels)
        self.kv_total = Gauge("streamoe_kv_blocks_total", "KV blocks in the pool", list(labels),
                              registry=self.registry).labels(**labels)
        # NOTE: each worker rank counts as one GPU in `streamoe cost` (shared/cost/README.md): its seconds up.
        self.gpu_seconds = Counter(metric_names.GPU_SECONDS, "Seconds this rank has been up (one GPU each)",
                                   list(labels), registry=self.registry).labels(**labels)
        self.tokens = Counter(metric_names.WORKER_TOKENS, "Tokens this rank computed, by kind "
                              "(prefill: input_cache_hit, input_cache_miss; decode: output)",
                              [*labels, "kind"], registry=self.registry)
        self.step_seconds = Histogram("streamoe_step_seconds", "Engine step time", list(labels),
                                      buckets=_STEP_BUCKETS, registry=self.registry).labels(**labels)
        self.batch_tokens = Histogram("streamoe_batch_tokens", "Tokens computed per step", list(labels),
                                      buckets=_BATCH_BUCKETS, registry=self.registry).labels(**labels)
        self.running = Gauge("streamoe_running_requests", "Requests in the engine's batch", list(labels),
                             registry=self.registry).labels(**labels)
        self.waiting = Gauge("streamoe_waiting_requests", "Requests queued on this rank", list(labels),
                             registry=self.registry).labels(**labels)
        self.expert_tokens = Counter("streamoe_expert_tokens", "Tokens routed to each expert on this rank",
                                     [*labels, "layer", "expert"], registry=self.registry)
        self.cache_write_seconds = Histogram("streamoe_cache_write_seconds", "Time to write one request's new "
                                             "blocks to the prefix cache (off the step's path)", list(labels),
                                             buckets=_STEP_BUCKETS, registry=self.registry).labels(**labels)
        self.cache_blocks_written = Counter("streamoe_cache_blocks_written", "Blocks this rank wrote to the prefix "
                                            "cache", list(labels), registry=self.registry).labels(**labels)
        self._expert_seen: dict[int, torch.Tensor] = {}
        self._spec_seen = SpecStats(accepted_per_pos=[0] * self.engine.num_spec)
        if self.engine.num_spec:
            def spec_counter(name: str, text: str, extra: tuple[str, ...] = ()) -> Counter:
                return Counter(name, text, [*labels, *extra], registry=self.registry)

            self.spec_counters = (
                spec_counter(metric_names.SPEC_DRAFTS, "Drafts (one request's drafts of one step)").labels(**labels),
                spec_counter(metric_names.SPEC_DRAFT_TOKENS, "Draft tokens proposed by the MTP layer").labels(**labels),
                spec_counter(metric_names.SPEC_ACCEPTED_TOKENS, "Draft tokens accepted").labels(**labels),
                spec_counter(metric_names.SPEC_ACCEPTED_PER_POS, "Drafts accepted at each draft position (0: the "
                             "first)", ("position",)))
        self._up_since = time.monotonic()

    def build_engine(self, args: argparse.Namespace) -> Engine:
        """The model (this rank's experts only in an EP group) and its engine, on the compute thread."""
        model = self.load_ep(args) if args.ep_size > 1 else load_model(args.model, dtype=args.dtype,
                                                                        device=args.device)
        model.set_moe_backend(args.moe_backend)  # refused, naming device and dtype, where it cannot run
        try:
            self.speculative_tokens = resolve_speculative_tokens(getattr(args, "speculative_tokens", "auto"),
                                                                 model.mtp is not None)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        return Engine(model, EngineConfig(
            kv_cache_bytes=args.kv_cache_mib << 20, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, mode=self.role,
            model_fingerprint=checkpoint_fingerprint(args.model, model.dtype),
            speculative_tokens=self.speculative_tokens))

    async def setup_engine_service(self) -> None:
        """What every worker sets up after its own stream: aborts, the prefix cache, the EP group
        (waits for every rank), and a first load report so the balancer sees it."""
        asyncio.get_running_loop().set_default_executor(serial_pool())  # to_thread's helpers: no OpenMP teams
        await self.setup_aborts()
        await self.setup_prefix_cache()
        await self.announce_predecessor()
        await self.setup_group()
        await self.report_load(force=True)
        self.in_background(self.keep_load_report())
        if self.args.event_loop_cpus is not None:  # set up: from here the loop's work leaves the steps' CPUs
            os.sched_setaffinity(0, self.args.event_loop_cpus)

    async def drop_all(self) -> None:
        """Forget every request this rank runs, sending nothing: it was cut out of its EP group while
        it did not answer (shared/ep/rank.py), and a death notice sent its work elsewhere."""
        for request_id in list(self.engine_requests()):
            await self.compute(self.engine.abort, request_id)

    def engine_requests(self) -> list[str]:
        """The ids of the requests this rank holds (the subclass knows them)."""
        return []

    async def announce_predecessor(self) -> None:
        """This rank started while another instance's load report for it remains, and that one is
        not draining: it died without a word (a container restarted in place after a kill -9 or an
        OOM kill). A death notice for it lets its group, the balancer and its requests go on now,
        not after their timeouts (shared/runtime/notices.py)."""
        notice = await notices.previous_incarnation(self.redis, self.role, self.group_id, self.rank,
                                                    self.args.ep_size, self.config.instance_id)
        if notice is not None and notice.instance_id != getattr(self.args, "successor_of", None):
            notice = await notices.publish(self.redis, notice)
            self.log.warning(json.dumps({"event": "predecessor_announced_dead", "instance": notice.instance_id,
                                         "group": self.group_id, "rank": self.rank}))

    def request_stop(self) -> None:
        """SIGTERM: drain now where another instance serves this rank's work (the rank's
        successor, or other ranks of the role); where none does, hand over first (`hand_over`)."""
        if self.stopping.is_set() or self.handing_over:
            return
        if not self.ready:  # still starting: nothing to hand over
            self.stopping.set()
            return
        self.handing_over = True
        self.in_background(self.hand_over())

    async def hand_over(self) -> None:
        """The only rank of its role leaves without stranding a request: a handover notice asks its
        supervisor for a successor, and this rank serves on (its heartbeat says draining, so the
        successor does not take it for dead) until the successor reports load for the rank (it
        reads the same input stream), or --handover-timeout-s passes. Then the drain proper: the
        leave notice sends what it still runs to the successor (shared/runtime/notices.py)."""
        try:
            await self.beat()  # draining now: the successor must not announce this rank dead
            if await self.successor() is None and not await notices.others_serve(self.redis, self.role,
                                                                                 self.group_id, self.rank):
                await notices.publish(self.redis, Notice("handover", self.role, self.config.instance_id,
                                                         self.group_id, self.rank, self.args.ep_size,
                                                         reason="sigterm"))
                self.handovers.inc()
                self.log.info(json.dumps({"event": "handover_asked", "rank": self.rank}))
                deadline = time.monotonic() + self.args.handover_timeout_s
                while time.monotonic() < deadline and await self.successor() is None:
                    await asyncio.sleep(0.2)
                self.log.info(json.dumps({"event": "handover_done" if time.monotonic() < deadline
                                          else "handover_timed_out", "rank": self.rank}))
        except RedisError as e:
            self.log.warning(json.dumps({"event": "handover_failed", "error": repr(e)}))
        finally:
            self.stopping.set()

    def draining(self) -> bool:
        return self.stopping.is_set() or self.handing_over

    async def successor(self) -> str | None:
        """Another instance that reports load for this rank and is up (heartbeat ready, not draining)."""
        other = await notices.other_reporter(self.redis, self.role, self.group_id, self.rank, self.config.instance_id)
        if other is None:
            return None
        beat = await self.redis.get(streams.heartbeat_key(self.role, other))
        if beat is None:
            return None
        beat = json.loads(beat)
        return other if beat.get("ready") and not beat.get("draining") else None

    async def drained(self) -> None:
        """A leave notice once the loop has stopped (shared/runtime/notices.py): it reads and steps
        no more, so its EP peers re-form without it, the balancer routes to it no more, and what it
        still holds goes on elsewhere now: a decode rank's running requests resume from their
        ownership records, a prefill rank's unfinished tasks are routed again."""
        incarnation = self.group.transport.incarnation if self.group is not None else b""
        await notices.publish(self.redis, Notice("leave", self.role, self.config.instance_id, self.group_id,
                                                 self.rank, self.args.ep_size, incarnation, reason="sigterm"))
        self.log.info(json.dumps({"event": "left", "group": self.group_id, "rank": self.rank}))

    def trimmed_streams(self) -> list[str]:
        return [self.stream]  # the worker's own input stream

    def health_fields(self) -> dict:
        return self.numerics.health()

    @property
    def idle(self) -> bool:
        return not self.engine.has_unfinished() and not self.group_busy

    async def setup_prefix_cache(self) -> None:
        self.prefix_cache = None
        if self.args.cache_dir is not None:
            self.prefix_cache = PrefixCache(self.args.cache_dir, self.args.cache_capacity_mib << 20, self.redis,
                                            self.engine.config.model_fingerprint, self.args.cache_write_delay_s)
        self.background: set[asyncio.Task] = set()

    def write_blocks(self, token_ids: list[int], cache_salt: str | None, kv: torch.Tensor,
                     skip_blocks: int = 0) -> None:
        """Store full blocks in the prefix cache off the step's path: on another thread, while the
        compute thread goes on with the next steps; timed in streamoe_cache_write_seconds."""
        self.in_background(self.store_blocks(token_ids, cache_salt, kv, skip_blocks))

    async def store_blocks(self, token_ids: list[int], cache_salt: str | None, kv: torch.Tensor,
                           skip_blocks: int = 0) -> None:
        """Store full blocks in the prefix cache (on another thread), timed; returns once written."""
        start = time.perf_counter()
        written = await self.prefix_cache.insert(token_ids, cache_salt, kv, skip_blocks)
        self.cache_write_seconds.observe(time.perf_counter() - start)
        self.cache_blocks_written.inc(written)

    def in_background(self, coro) -> None:
        """Work that must not delay a step (block writes): kept referenced until done."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning(json.dumps({"event": "background_failed", "error": repr(task.exception())}))

    async def setup_aborts(self) -> None:
        """Every worker instance sees every abort: a consumer group of its own, from now on."""
        self.abort_group = streams.consumer_group(f"aborts-{self.config.instance_id}")
        await self.bus.ensure_consumer_group(streams.ABORTS, self.abort_group, start_id="$")

    async def take_aborts(self) -> list[str]:
        """Abort what this rank runs of the requests cancelled since the last call."""
        entries = await self.bus.read(streams.ABORTS, self.abort_group, Abort, count=256, block_ms=None)
        entries += await self.bus.reclaim_lost(streams.ABORTS, self.abort_group, Abort)
        ids = [e.message.request_id for e in entries]
        for request_id in ids:
            self.aborted.append(request_id)
            if await self.compute(self.engine.abort, request_id):
                self.aborts_done.inc()
        await self.bus.ack(streams.ABORTS, self.abort_group, *[e.entry_id for e in entries])
        return ids

    async def compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.compute_pool, fn, *args)

    def _step(self, *args):
        """engine.step on the compute thread, with the machine's idle cores when a core lease lends them."""
        if self.core_lease is None:
            return self.engine.step(*args)
        self.core_lease.before_step()
        try:
            return self.engine.step(*args)
        finally:
            self.core_lease.after_step(self.engine.has_unfinished())

    async def timed_step(self, *args):
        """One engine step on the compute thread, with its time and size in the metrics."""
        start = time.perf_counter()
        deltas = await self.compute(self._step, *args)
        self.step_seconds.observe(time.perf_counter() - start)
        self.batch_tokens.observe(self.engine.last_num_tokens)
        self.count_spec()  # before the step's tokens go out: a client that has them sees their drafts counted
        return deltas

    async def report_load(self, force: bool = False, pending_compute: float = 0.0, pending_tokens: int = 0) -> None:
        self.kv_used.set(self.engine.blocks.num_blocks - self.engine.blocks.num_free)
        self.kv_total.set(self.engine.blocks.num_blocks)
        self.running.set(len(self.engine.scheduler.running))
        self.waiting.set(len(self.engine.scheduler.waiting))
        up = time.monotonic()
        self.gpu_seconds.inc(up - self._up_since)
        self._up_since = up
        now = time.time()
        if not force and now - self._last_report < self.args.load_ttl_s / 5 and not self.stopping.is_set():
            return
        self._last_report = now
        self.before_scrape()
        blocks = self.engine.blocks
        report = LoadReport(self.role, self.rank, self.config.instance_id, len(self.engine.scheduler.running),
                            len(self.engine.scheduler.waiting), blocks.num_blocks - blocks.num_free, blocks.num_blocks,
                            self.args.max_num_seqs, pending_compute, pending_tokens, now, self.group_id)
        self._report = encode(report)
        await self.send_load_report()

    async def send_load_report(self) -> None:
        if self.handing_over and not self.stopping.is_set():  # serving on; the successor's report wins
            if await self.successor() is not None:
                return
        if self.stopping.is_set():  # draining: the balancer routes to the other ranks from now on
            if not self._withdrawn:
                self._withdrawn = True
                if await notices.others_serve(self.redis, self.role, self.group_id, self.rank):
                    await self.redis.delete(self.load_key)
            return
        await self.redis.set(self.load_key, self._report, px=int(self.args.load_ttl_s * 1000))
        self._sent_report = self._report

    async def keep_load_report(self) -> None:
        """While the main loop is held up (a long step, or the EP group waiting on a dead rank and
        re-forming), the last load report is renewed, so the balancer keeps routing here and the
        gateway does not answer 503 for a live rank. The report keeps its time: the balancer still
        adds what it sent since."""
        while not self._closing.is_set():
            await self._pause(self.args.load_ttl_s / 3)
            if time.time() - self._last_report < self.args.load_ttl_s / 2:
                continue
            try:
                await self.send_load_report()
            except RedisError as e:
                self.log.warning(json.dumps({"event": "load_report_failed", "error": repr(e)}))

    def before_scrape(self) -> None:
        """The expert and EP counters are read from the model at a scrape and with each load report,
        not after every step: a step's ~500 labelled increments cost it a few percent."""
        self.count_expert_load()
        self.count_dispatched()

    def count_expert_load(self) -> None:
        """The MoE layers' routed-token counts, as counters (what they gained since the last look)."""
        for layer, block in enumerate(self.engine.model.model.layers):
            load = getattr(block.mlp, "expert_load", None)
            if load is None:
                continue
            now = load.cpu().clone()
            gained = now - self._expert_seen.get(layer, torch.zeros_like(now))
            self._expert_seen[layer] = now
            for expert in gained.nonzero().flatten().tolist():
                self.expert_tokens.labels(**self.metric_labels, layer=str(layer),
                                          expert=str(expert)).inc(int(gained[expert]))

    def count_spec(self) -> None:
        """The engine's speculation counters, as counters (what they gained since the last look)."""
        spec, seen = self.engine.spec, self._spec_seen
        if not self.engine.num_spec or spec.num_drafts == seen.num_drafts:
            return
        drafts, tokens, accepted, per_pos = self.spec_counters
        drafts.inc(spec.num_drafts - seen.num_drafts)
        tokens.inc(spec.num_draft_tokens - seen.num_draft_tokens)
        accepted.inc(spec.num_accepted_tokens - seen.num_accepted_tokens)
        for k, (now, before) in enumerate(zip(spec.accepted_per_pos, seen.accepted_per_pos)):
            per_pos.labels(**self.metric_labels, position=str(k)).inc(now - before)
        self._spec_seen = SpecStats(spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens,
                                    list(spec.accepted_per_pos))

    async def housekeeping(self) -> None:
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.flush)
        if self.group is not None:
            await self.eplb_upkeep()
        await super().housekeeping()

    async def teardown(self) -> None:
        if self.tracer is not None:
            self.tracer.flush()
        if self.group is not None:
            await self.membership.clear_alive()
            await self.group.transport.close()
        await self.redis.xgroup_destroy(streams.ABORTS, self.abort_group)
        if getattr(self, "_sent_report", None) is not None:  # ours only: a successor's report stays
            await self.redis.eval(_DELETE_IF_EQUAL, 1, self.load_key, self._sent_report)
        self.compute_pool.shutdown(wait=False)
        if self.core_lease is not None:
            self.core_lease.close()


def compute_pool(threads: int) -> ThreadPoolExecutor:
    """The compute thread, on the CPUs this process runs on now, its OpenMP team `threads` strong."""
    return ThreadPoolExecutor(1, thread_name_prefix="compute", initializer=compute_thread,
                              initargs=(frozenset(os.sched_getaffinity(0)), threads))


def compute_thread(cpus: frozenset[int], threads: int) -> None:
    """The compute thread's set-up: its name, its CPUs and its OpenMP team's size (torch's count)."""
    name_thread("compute")
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)


def engine_threads(args: argparse.Namespace) -> int:
    """--threads, or a share of the cores: what the rank computes with, so what calibration times."""
    return args.threads or max(1, available_cores() // 2)


def available_cores() -> int:
    """The CPUs this process may run on (`streamoe up --worker-cpus` pins the workers to some)."""
    return len(os.sched_getaffinity(0)) or 1


async def deployment_numerics(args: argparse.Namespace, log: logging.Logger) -> Numerics | None:
    """--dtype and --moe-backend before the model loads: the value the deployment published in
    Redis, else this rank's calibration, published for the other ranks (shared/runtime/numerics.py).
    None: Redis refused our credentials (logged once)."""
    from shared.runtime.service import can_authenticate

    shapes = Shapes.of_model(args.model)
    checksum = weights_checksum(args.model)
    redis = redis_client.connect(args.redis_url, args.redis_cluster)
    if not await can_authenticate(redis, log):
        return None
    try:
        for delay in (0.5, 1, 2, 4, 8, 15, 30, None):  # a pod may start before Redis
            try:
                return await agree(redis, checksum, args.dtype, args.moe_backend, lambda: resolve(
                    shapes, args.device, engine_threads(args), args.dtype, args.moe_backend))
            except redis_client.OUTAGE_ERRORS as e:
                if delay is None:
                    raise SystemExit(f"--dtype={args.dtype} --moe-backend={args.moe_backend}: Redis stayed "
                                     f"unreachable ({e}); check --redis-url, or give both values explicitly") from e
                log.warning(json.dumps({"event": "numerics_redis_unreachable", "error": repr(e), "retry_in_s": delay}))
                await asyncio.sleep(delay)
    finally:
        await redis.aclose()


def engine_main(service_cls: type[EngineService], argv: list[str] | None = None) -> int:
    """The `python -m services.prefill|decode` entry point."""
    import uvloop

    from shared.runtime.service import add_service_args, parse_service_args, service_config

    parser = argparse.ArgumentParser(prog=f"python -m services.{service_cls.role}")
    add_service_args(parser)
    add_engine_args(parser)
    parser.add_argument("--role", default=service_cls.role, choices=[service_cls.role])
    args = parse_service_args(parser, argv)
    try:
        numerics = asyncio.run(deployment_numerics(args, logging.getLogger(f"streamoe.{service_cls.name}")))
    except ValueError as e:  # a plan this device and dtype cannot run, a checkpoint without weights
        raise SystemExit(f"{parser.prog}: error: {e}") from None
    if numerics is None:
        return 2
    return uvloop.run(service_cls(service_config(args), args, numerics).run())
