"""An EP rank: what a prefill or decode worker adds when it is one rank of an expert-parallel
group — its slice of the experts, the group's transport and step agreement, the overlapped
micro-batches, and its side of EPLB (load reports, staged placements, the switch).

A mixin of WorkerService (shared/worker.py): it uses the service's args, role, rank, registry,
log, redis, engine and compute thread.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

from prometheus_client import Counter, Gauge, Histogram

from .. import streams
from ..messages import ExpertLoad, PlacementUpdate
from ..model.config import ModelArgs
from ..model.loader import load_model
from ..model.model import DeepseekV3
from ..wire import decode, encode
from .group import EPGroup
from .moe import apply_expert_parallel, initial_placement, keep_tensor, local_experts
from .overlap import Overlap, Tracer
from .rollout import Rollout
from .transport import RedisTransport

# NOTE: the per-phase default, by measurement (README, "Overlap"): prefill is compute-bound and
# hides its wire time; a decode micro-batch re-reads nearly every expert's weights (design.md §8).
OVERLAP_BY_DEFAULT = ("prefill",)
_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class EPRank:
    group: EPGroup | None = None
    tracer: Tracer | None = None
    _staging: asyncio.Task | None = None
    group_busy = False  # the group's last step had work somewhere: do not idle-block

    def load_ep(self, args: argparse.Namespace) -> DeepseekV3:
        """The model with only this rank's routed experts read and kept, in the placement the
        group uses (the initial one, or the last EPLB placement published)."""
        config = ModelArgs.from_file(args.model / "config.json")
        num_moe = config.num_hidden_layers - config.first_k_dense_replace
        self.num_groups = config.n_group
        self.placement = initial_placement(config.n_routed_experts,
                                           config.n_routed_experts + args.num_redundant_experts, num_moe)
        self.placement_version = 0
        current = self.current_placement(args)  # the group may have rolled out EPLB placements already
        if current is not None and [len(r) for r in current.phy2log] == [len(r) for r in self.placement]:
            self.placement, self.placement_version = current.phy2log, current.version
        layers = list(range(config.first_k_dense_replace, config.num_hidden_layers))
        model = load_model(args.model, dtype=args.dtype, device=args.device,
                           keep=keep_tensor(local_experts(self.placement, layers, args.rank, args.ep_size)))
        self.ep_layers = apply_expert_parallel(model, args.rank, args.ep_size, self.placement, self.exchange,
                                               args.ep_wire)
        labels = {"role": self.role, "rank": str(args.rank)}
        self.ep_bytes = Counter("streamoe_ep_sent_bytes", "Bytes this rank sent to its EP peers, by phase",
                                [*labels, "phase"], registry=self.registry)
        self.ep_seconds = Histogram("streamoe_ep_exchange_seconds", "Dispatch/combine latency, from the start "
                                    "of the exchange to every rank's answer", [*labels, "phase"], buckets=_SECONDS,
                                    registry=self.registry)
        self.ep_tokens = Counter("streamoe_ep_dispatched_tokens", "Tokens dispatched to each rank of the group",
                                 [*labels, "peer"], registry=self.registry)
        Gauge("streamoe_expert_weight_bytes", "Routed-expert weight bytes resident on this rank", list(labels),
              registry=self.registry).labels(**labels).set(sum(
                  p.numel() * p.element_size() for moe in self.ep_layers for p in moe.experts.parameters()))
        self._ep_tokens_seen = [0] * args.ep_size
        return model

    def current_placement(self, args: argparse.Namespace) -> PlacementUpdate | None:
        import redis as sync_redis

        client = sync_redis.Redis.from_url(args.redis_url)
        try:
            raw = client.get(streams.placement_key(self.role, args.ep_group_id or self.role))
        finally:
            client.close()
        return decode(raw, PlacementUpdate) if raw else None

    def exchange(self, layer: int, phase: str, sends: list[bytes]) -> list[bytes]:
        """EPMoE layers call this from the compute thread (overlap off)."""
        return self.group.exchange(layer, phase, sends)

    def observe_exchange(self, phase: str, sent_bytes: int, seconds: float) -> None:
        labels = {"role": self.role, "rank": str(self.rank), "phase": phase}
        self.ep_bytes.labels(**labels).inc(sent_bytes)
        self.ep_seconds.labels(**labels).observe(seconds)

    async def setup_group(self) -> None:
        """Join the EP group (every rank must be up); a no-op without EP."""
        if self.args.ep_size == 1:
            return
        group_id = self.args.ep_group_id or self.role
        transport = RedisTransport(self.config.redis_url, self.role, self.rank, self.args.ep_size, group_id,
                                   timeout_s=self.args.ep_timeout_s, join_timeout_s=self.args.ep_join_timeout_s)
        await transport.start()
        self.group = EPGroup(transport, asyncio.get_running_loop(), self.args.ep_timeout_s, self.observe_exchange)
        overlap = self.args.overlap == "on" or (self.args.overlap == "auto" and self.role in OVERLAP_BY_DEFAULT)
        if overlap:
            self.tracer = Tracer(self.args.trace, self.rank, self.role)
            self.engine.runner.overlap = Overlap(self.group, self.tracer)
        self.engine.on_idle_step = self.engine.runner.idle
        self.rollout = Rollout(self.args.model, self.engine.model.dtype, self.ep_layers, self.placement_version)
        self.log.info(json.dumps({"event": "ep_group_joined", "group": group_id, "rank": self.rank,
                                  "size": self.args.ep_size}))

    async def should_step(self) -> bool:
        """Without EP: when this rank has work. In a group: when any rank has (all step together)."""
        has_work = self.engine.has_unfinished()
        if self.group is None:
            return has_work
        self.group_busy = await self.group.begin_step(has_work, self.rollout.staged_version)
        if self.group.agreed_version > self.rollout.version:  # every rank staged it: switch, all at this step
            if await self.compute(self.rollout.switch, self.group.agreed_version):
                self.log.info(json.dumps({"event": "placement_switched", "version": self.rollout.version,
                                          "step": self.group.step}))
        return self.group_busy

    def count_dispatched(self) -> None:
        if not getattr(self, "ep_layers", None):
            return
        total = [sum(int(m.dispatched[p]) for m in self.ep_layers) for p in range(self.args.ep_size)]
        for peer, (now, seen) in enumerate(zip(total, self._ep_tokens_seen)):
            if now > seen:
                self.ep_tokens.labels(role=self.role, rank=str(self.rank), peer=str(peer)).inc(now - seen)
        self._ep_tokens_seen = total

    async def eplb_upkeep(self) -> None:
        """Report this rank's expert load; stage a newer placement the balancer published."""
        group_id = self.args.ep_group_id or self.role
        counts = [moe.expert_load.tolist() if moe.expert_load is not None else [0] * moe.num_experts
                  for moe in self.ep_layers]
        report = ExpertLoad(self.role, group_id, self.rank, self.args.ep_size, len(self.ep_layers[0].phy2log),
                            self.num_groups, self.rollout.version, counts, time.time())
        await self.redis.set(streams.expert_load_key(self.role, group_id, self.rank), encode(report),
                             px=int(max(30.0, 6 * self.config.housekeeping_s) * 1000))
        raw = await self.redis.get(streams.placement_key(self.role, group_id))
        if raw is None or self._staging is not None or not self.rollout.is_staging_free:
            return
        update = decode(raw, PlacementUpdate)
        if update.version > self.rollout.version:
            self._staging = asyncio.create_task(self.stage(update))

    async def stage(self, update: PlacementUpdate) -> None:
        try:
            await asyncio.to_thread(self.rollout.stage, update.version, update.phy2log)  # off the compute thread
            self.log.info(json.dumps({"event": "placement_staged", "version": update.version,
                                      "experts_read": self.rollout.num_experts_read}))
        except Exception as e:
            self.log.error(json.dumps({"event": "placement_not_staged", "version": update.version, "error": repr(e)}))
        finally:
            self._staging = None
