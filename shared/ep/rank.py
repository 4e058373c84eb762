"""An EP rank: what a prefill or decode worker adds when it is one rank of an expert-parallel
group — its slice of the experts, the group's transport and step agreement, the overlapped
micro-batches, its side of EPLB (load reports, staged placements, the switch), and the group's
re-forming when a rank dies or comes back (membership.py).

A mixin of EngineService (shared/runtime/engine_service.py): it uses the service's args, role, rank, group_id,
registry, log, redis, engine and compute thread.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from shared.ep.eplb import initial_placement
from shared.ep.group import EPGroup
from shared.ep.membership import Membership, Record, ranks_of
from shared.ep.moe import apply_expert_parallel, keep_tensor, local_experts, member_owners
from shared.ep.overlap import Overlap, Tracer
from shared.ep.rollout import Rollout
from shared.ep.transport import ExchangeTimeout, RedisTransport
from shared.model.config import ModelArgs
from shared.model.loader import load_model
from shared.model.model import DeepseekV3
from shared.protocol import streams
from shared.protocol.messages import ExpertLoad, Notice, PlacementUpdate
from shared.protocol.wire import decode, encode
from shared.runtime import notices, redis_client

# NOTE: the per-phase default, by measurement (shared/ep/README.md, "Limits"): prefill is
# compute-bound and hides its wire time; a decode micro-batch re-reads nearly every expert's weights.
OVERLAP_BY_DEFAULT = ("prefill",)
_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class EPRank:
    group: EPGroup | None = None
    tracer: Tracer | None = None
    _staging: asyncio.Task | None = None
    group_busy = False  # the group's last step had work somewhere: do not idle-block
    membership: Membership | None = None
    joiners_seen = 0  # ranks asking to join, as this rank last saw (bit mask)
    joining = True  # not (yet, or any more) a member of the running group
    members_since = 0.0  # monotonic time this rank last applied a record
    peer_instances: dict[int, str]  # rank -> the instance it last reported load as (note_peer_instances)

    def load_ep(self, args: argparse.Namespace) -> DeepseekV3:
        """The model with only this rank's routed experts read and kept, in the placement the
        group uses (the initial one, or the last EPLB placement published)."""
        config = ModelArgs.from_file(args.model / "config.json")
        num_moe = config.num_hidden_layers - config.first_k_dense_replace + config.num_mtp_layers  # MTP's last
        self.num_groups = config.n_group
        self.placement = initial_placement(config.n_routed_experts,
                                           config.n_routed_experts + args.num_redundant_experts, num_moe)
        self.placement_version = 0
        current = self.current_placement(args)  # the group may have rolled out EPLB placements already
        if current is not None and [len(r) for r in current.phy2log] == [len(r) for r in self.placement]:
            self.placement, self.placement_version = current.phy2log, current.version
        layers = list(range(config.first_k_dense_replace, config.num_kv_layers))  # the MTP layer's included
        model = load_model(args.model, dtype=args.dtype, device=args.device,
                           keep=keep_tensor(local_experts(self.placement, layers, args.rank, args.ep_size)))
        self.ep_layers = apply_expert_parallel(model, args.rank, args.ep_size, self.placement, self.exchange,
                                               args.ep_wire)
        labels = self.metric_labels
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
        self.ep_members = Gauge("streamoe_ep_group_members", "Ranks in this rank's EP group now (fewer than "
                                "ep_size while it runs without a dead rank)", list(labels),
                                registry=self.registry).labels(**labels)
        self.ep_reforms = Counter("streamoe_ep_reforms", "Times this rank's EP group re-formed: shrink (without a "
                                  "rank that stopped answering) or grow (a rank back); reason: notice (a death "
                                  "notice named the rank), timeout (an exchange timed out), join (a rank asked in)",
                                  [*labels, "change", "reason"], registry=self.registry)
        self._ep_tokens_seen = [0] * args.ep_size
        return model

    def current_placement(self, args: argparse.Namespace) -> PlacementUpdate | None:
        client = redis_client.connect_sync(args.redis_url, args.redis_cluster)
        try:
            raw = client.get(streams.placement_key(self.role, self.group_id))
        finally:
            client.close()
        return decode(raw, PlacementUpdate) if raw else None

    def exchange(self, layer: int, phase: str, sends: list[bytes]) -> list[bytes]:
        """EPMoE layers call this from the compute thread (overlap off)."""
        return self.group.exchange(layer, phase, sends)

    def observe_exchange(self, phase: str, sent_bytes: int, seconds: float) -> None:
        labels = {**self.metric_labels, "phase": phase}
        self.ep_bytes.labels(**labels).inc(sent_bytes)
        self.ep_seconds.labels(**labels).observe(seconds)

    async def setup_group(self) -> None:
        """Join the EP group: with every rank when the group starts, or ask in when it already runs
        (this rank restarted); a no-op without EP."""
        if self.args.ep_size == 1:
            return
        transport = RedisTransport(self.config.redis_url, self.role, self.rank, self.args.ep_size, self.group_id,
                                   timeout_s=self.args.ep_timeout_s, join_timeout_s=self.args.ep_join_timeout_s,
                                   cluster=self.config.redis_cluster)
        self.group = EPGroup(transport, asyncio.get_running_loop(), self.args.ep_timeout_s, self.observe_exchange)
        self.group.mtp_calls = self.engine.mtp_calls  # checked equal on every rank at each step
        self.membership = Membership(self.redis, self.role, self.group_id, self.rank, self.args.ep_size,
                                     transport.incarnation, self.args.rank_dead_after_s)
        self.peer_instances = {}
        overlap = self.args.overlap == "on" or (self.args.overlap == "auto" and self.role in OVERLAP_BY_DEFAULT)
        if overlap:
            self.tracer = Tracer(self.args.trace, self.rank, self.role)
            self.engine.runner.overlap = Overlap(self.group, self.tracer)
        self.engine.on_idle_step = self.engine.runner.idle
        self.rollout = Rollout(self.args.model, self.engine.model.dtype, self.ep_layers, self.placement_version)
        if await self.membership.others_alive():
            await self.join_running_group()
        else:
            await self.start_group()
        self.in_background(self.keep_membership())
        self.log.info(json.dumps({"event": "ep_group_joined", "group": self.group_id, "rank": self.rank,
                                  "size": self.args.ep_size, "epoch": self.group.epoch,
                                  "members": self.group.members}))

    async def start_group(self) -> None:
        """Every rank joins; they agree on the epoch (one past the newest any of them has read)."""
        everyone = list(range(self.args.ep_size))
        self.group.transport.set_members(everyone)
        await self.group.transport.start()
        record = await self.membership.read()
        seen = [int(r) for r in await self.group.transport.all_to_all(
            "boot", [b"%d" % (record.epoch if record else 0)] * self.args.ep_size)]
        record = await self.membership.commit(max(seen), everyone, self.rollout.version, self.rollout.placement())
        self.group.reform(record.epoch, record.members)
        await self.membership.renew_alive()
        self.joining = False
        self.members_since = time.monotonic()
        self.ep_members.set(len(record.members))

    async def join_running_group(self) -> None:
        """Ask the running group to take this rank in, and wait until its members have committed a
        record with it; start the group anew if its members all went away meanwhile."""
        self.joining = True
        transport = self.group.transport
        transport.set_members([self.rank])
        await transport.start()  # the reader runs: the members' hellos are answered
        asked = await self.membership.read()
        asked_epoch = asked.epoch if asked else 0
        self.log.info(json.dumps({"event": "ep_join_asked", "rank": self.rank, "epoch": asked_epoch}))
        while not self.stopping.is_set():
            await self.membership.ask_to_join()
            record = await self.membership.read()
            if record is not None and record.epoch > asked_epoch and self.rank in record.members:
                await self.membership.stop_asking()
                await self.apply_membership(record, "join")
                return
            if not await self.membership.others_alive():
                await self.membership.stop_asking()
                await self.start_group()
                return
            await asyncio.sleep(0.2)

    async def apply_membership(self, record: Record, reason: str) -> None:
        """Compute with the record's members and placement: take a share of the slots of the ranks
        out of the group (their experts read from the checkpoint), exchange among the members only,
        count steps from 0 under the record's epoch, and join the members."""
        owners = [member_owners(len(row), self.args.ep_size, record.members) for row in record.phy2log]
        if owners != self.rollout.owners() or record.phy2log != self.rollout.placement():
            await self.compute(self.rollout.discard)  # an EPLB placement staged for the old members
            staged = await asyncio.to_thread(self.rollout.stage_members, record.phy2log, owners)
            await self.compute(self.rollout.switch_members, record.version, record.phy2log, owners, staged)
        before = len(self.group.members)
        self.group.reform(record.epoch, record.members)
        await self.group.transport.start(self.args.ep_timeout_s, fail_on_gone=True)
        await self.membership.renew_alive()
        self.joining = False
        self.members_since = time.monotonic()
        self.rollout.version = record.version
        self.ep_members.set(len(record.members))
        change = "shrink" if len(record.members) < before else "grow" if len(record.members) > before else "same"
        self.ep_reforms.labels(**self.metric_labels, change=change, reason=reason).inc()
        self.log.info(json.dumps({"event": "ep_group_reformed", "change": change, "reason": reason,
                                  "epoch": record.epoch,
                                  "members": record.members, "experts_read": self.rollout.num_experts_read}))

    async def group_step(self, step) -> None:
        """One turn of the group: `await step()` when any member has work. An exchange that times
        out (a rank died mid-step) re-forms the group without it; the step's work is not lost: the
        engine advances only after a step completes, so the next turn computes it again."""
        try:
            if await self.should_step():
                await step()
        except ExchangeTimeout as e:
            if self.group is None or self.stopping.is_set():
                raise
            await self.recover(e)

    async def recover(self, error: ExchangeTimeout) -> None:
        """Re-form the group without the ranks `error` names. A death notice (error.noticed) names
        ranks known dead: the roll call waits for the others only, with no grace for the named."""
        self.log.warning(json.dumps({"event": "ep_exchange_failed", "epoch": self.group.epoch,
                                     "key": error.key, "missing": error.missing, "noticed": error.noticed}))
        settle_s = max(1.0, min(3.0, self.args.ep_timeout_s))
        reason = error.cause
        while not self.stopping.is_set():
            record = await self.membership.read()
            epoch = self.group.epoch
            if record is None or record.epoch <= epoch:
                before = set(self.group.members)
                called = await self.membership.roll_call(epoch + 1, before, settle_s,
                                                         set(error.missing), grace_s=0.0 if error.noticed else 1.0)
                record = await self.membership.commit(epoch, called, self.rollout.version, self.rollout.placement())
                cut = sorted(before - set(record.members))
                if cut and reason in ("heartbeat", "timeout") and self.rank == min(record.members):
                    await self.announce_cut(cut, reason)
            if self.rank not in record.members:  # counted out (too slow, frozen): ask in like a restarted rank
                await self.on_fenced(record)
                await self.join_running_group()
                return
            try:
                await self.apply_membership(record, reason)
                return
            except ExchangeTimeout as e:  # a member of the new record did not answer: again
                error = e
                reason = "notice" if e.noticed else reason
                self.log.warning(json.dumps({"event": "ep_reform_failed", "epoch": record.epoch,
                                             "missing": e.missing}))

    async def should_step(self) -> bool:
        """Without EP: when this rank has work. In a group: when any rank has (all step together).
        A turn on which every member has seen a rank asking to join takes it in instead."""
        has_work = self.engine.has_unfinished()
        if self.group is None:
            return has_work
        self.group_busy = await self.group.begin_step(has_work, self.rollout.staged_version, self.joiners_seen)
        if self.group.agreed_joiners:
            members = sorted(set(self.group.members) | set(ranks_of(self.group.agreed_joiners)))
            self.joiners_seen = 0
            record = await self.membership.commit(self.group.epoch, members, self.rollout.version,
                                                  self.rollout.placement())
            if self.rank in record.members:
                await self.apply_membership(record, "join")
            else:  # a shrink committed meanwhile left this rank out
                await self.join_running_group()
            return False
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
                self.ep_tokens.labels(**self.metric_labels, peer=str(peer)).inc(now - seen)
        self._ep_tokens_seen = total

    async def keep_membership(self) -> None:
        """Three times per --rank-dead-after-s (at least once a second), while a member: renew the
        alive key, look for ranks asking to join, and watch the others (watch_members)."""
        while not self._closing.is_set():
            await self._pause(min(1.0, self.args.rank_dead_after_s / 3))
            if self.joining or self.stopping.is_set():  # leaving: its leave notice removes the alive key
                continue
            try:
                await self.membership.renew_alive()
                self.joiners_seen = await self.membership.joiners(self.group.members)
                await self.watch_members()
            except RedisError as e:
                self.log.warning(json.dumps({"event": "membership_upkeep_failed", "error": repr(e)}))

    async def watch_members(self) -> None:
        """A member whose alive key lapsed (frozen, hung: it renews it no more) is taken for gone: the
        exchange waiting for it fails now and the group re-forms without it (reason `heartbeat`). A
        rank that finds a newer record without itself was cut out while it did not answer: its own
        exchanges fail now (cause `fenced`), and it drops what it ran and asks in as new."""
        record = await self.membership.read()
        if record is not None and record.epoch > self.group.epoch and self.rank not in record.members:
            self.group.transport.mark_gone([p for p in self.group.members if p != self.rank], "fenced")
            return
        await self.note_peer_instances()
        if time.monotonic() - self.members_since < self.args.rank_dead_after_s:
            return  # a member taken in a moment ago may not have renewed yet
        alive = await self.membership.others_alive()
        lapsed = [p for p in self.group.members if p != self.rank and p not in alive]
        if lapsed:
            self.log.warning(json.dumps({"event": "ep_rank_lapsed", "ranks": lapsed, "epoch": self.group.epoch}))
            self.group.transport.mark_gone(lapsed, "heartbeat")

    async def note_peer_instances(self) -> None:
        """The instance each other member runs as, from its load report, kept after the report
        lapses: a frozen rank's report (--load-ttl-s) can lapse before the group has cut it out,
        and its death notice must still name the instance whose requests the balancer resumes."""
        peers = [p for p in self.group.members if p != self.rank]
        keys = [streams.load_key(self.role, self.group_id, p) for p in peers]
        for peer, raw in zip(peers, await redis_client.mget(self.redis, keys)):
            instance = notices.instance_of(raw) if raw is not None else None
            if instance:
                self.peer_instances[peer] = instance

    async def announce_cut(self, ranks: list[int], reason: str) -> None:
        """Death notices for ranks the group cut out without one (they stopped answering): the balancer
        resumes their requests and moves their queued work now (shared/runtime/notices.py). Each
        names the instance the rank ran as when last seen (note_peer_instances)."""
        for rank in ranks:
            try:
                await notices.publish(self.redis, Notice("death", self.role, self.peer_instances.get(rank, ""),
                                                         self.group_id, rank, self.args.ep_size,
                                                         reason=f"cut out ({reason})"))
            except RedisError as e:
                self.log.warning(json.dumps({"event": "cut_not_announced", "rank": rank, "error": repr(e)}))

    async def on_fenced(self, record: Record) -> None:
        """This rank was cut out of the group while it did not answer: what it ran was resumed or
        moved elsewhere. The service drops it (EngineService.drop_all), so no stale token goes out."""
        self.log.warning(json.dumps({"event": "ep_fenced", "epoch": record.epoch, "members": record.members}))
        await self.drop_all()

    async def eplb_upkeep(self) -> None:
        """Report this rank's expert load; stage a newer placement the balancer published (not
        while the group runs without a rank: a placement is staged for every rank's slots)."""
        counts = [moe.expert_load.tolist() if moe.expert_load is not None else [0] * moe.num_experts
                  for moe in self.ep_layers]
        report = ExpertLoad(self.role, self.group_id, self.rank, self.args.ep_size, len(self.ep_layers[0].phy2log),
                            self.num_groups, self.rollout.version, counts, time.time())
        await self.redis.set(streams.expert_load_key(self.role, self.group_id, self.rank), encode(report),
                             px=int(max(30.0, 6 * self.config.housekeeping_s) * 1000))
        raw = await self.redis.get(streams.placement_key(self.role, self.group_id))
        if (raw is None or self._staging is not None or not self.rollout.is_staging_free
                or len(self.group.members) < self.args.ep_size):
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
