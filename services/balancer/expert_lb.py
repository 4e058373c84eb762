"""The expert-parallel load balancer (EPLB), the balancer's third part: per EP group, a moving
window of the routed-token counts its ranks report; when a placement computed on that window
(shared/ep/eplb.py: hierarchical when the expert groups split over `--ep-nodes`, else global)
balances the window's load clearly better than the one in use, it is published, and the ranks
roll it out themselves (shared/ep/rollout.py). One rollout at a time: the next version is
published only once every rank reports the current one in use.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from shared.ep.eplb import (
    LoadWindow,
    NodeCounts,
    balance,
    initial_placement,
    placement_from_phy2log,
    rank_loads,
    rebalance_experts,
)
from shared.protocol import streams
from shared.protocol.messages import ExpertLoad, PlacementUpdate
from shared.protocol.wire import WireError, decode, encode
from shared.runtime import redis_client


@dataclass(frozen=True)
class EPLBSettings:
    window: int = 10  # intervals in the moving window
    ep_nodes: NodeCounts = NodeCounts()  # nodes each EP group spans (the hierarchical policy packs expert groups)
    min_gain: float = 0.05  # publish when max/mean rank load falls by at least this fraction
    min_tokens: int = 1000  # routed tokens the window must hold before a placement is computed


@dataclass
class EPGroupState:
    window: LoadWindow
    last: np.ndarray | None = None  # cumulative counts at the previous tick
    ranks: dict[int, float] = field(default_factory=dict)  # rank -> time of the report last used


class ExpertBalancer:
    def __init__(self, settings: EPLBSettings, log: logging.Logger):
        self.settings, self.log = settings, log
        self.ep_groups: dict[tuple[str, str], EPGroupState] = {}

    async def tick(self, redis) -> list[PlacementUpdate]:
        """One interval: gather every EP group's reports, maybe publish placements (returned)."""
        keys = [k async for k in redis.scan_iter(match=streams.expert_load_key("*", "*", "*"), count=1000)]
        reports: dict[tuple[str, str], list[ExpertLoad]] = {}
        for raw in await redis_client.mget(redis, keys):
            try:
                report = decode(raw, ExpertLoad) if raw is not None else None
            except WireError:
                continue
            if report is not None:
                reports.setdefault((report.role, report.group_id), []).append(report)
        published = []
        for key, group in reports.items():
            try:
                update = await self.consider(redis, key, group)
            except ValueError as e:  # e.g. --ep-nodes does not divide this group: the others go on
                self.log.warning(json.dumps({"event": "eplb_skipped", "group": list(key), "error": str(e)}))
                continue
            if update is not None:
                published.append(update)
        return published

    async def consider(self, redis, key: tuple[str, str], reports: list[ExpertLoad]) -> PlacementUpdate | None:
        ep_size = reports[0].ep_size
        if len({r.rank for r in reports}) != ep_size:
            return None  # a rank is missing (starting, or dead): wait for the whole group
        state = self.ep_groups.setdefault(key, EPGroupState(LoadWindow(self.settings.window)))
        counts = np.sum([np.asarray(r.counts, dtype=np.int64) for r in reports], axis=0)  # [L, E] cumulative
        if state.last is not None and state.last.shape == counts.shape and np.all(counts >= state.last):
            state.window.add(counts - state.last)
        state.last = counts  # NOTE: a restarted rank's counts restart at 0: that interval is skipped
        raw = await redis.get(streams.placement_key(*key))
        current = decode(raw, PlacementUpdate) if raw else None
        version = current.version if current else 0
        if any(r.placement_version != version for r in reports):
            return None  # a rollout is under way
        if state.window.num_added == 0:
            return None
        total = state.window.total()
        if total.sum() < self.settings.min_tokens:
            return None
        num_layers, num_experts = total.shape
        phy2log = current.phy2log if current else initial_placement(num_experts, reports[0].num_slots, num_layers)
        before = balance(rank_loads(total, placement_from_phy2log(phy2log, num_experts), ep_size))[1]
        new = rebalance_experts(total, reports[0].num_slots, reports[0].num_groups, self.settings.ep_nodes.of(key[1]),
                                ep_size)
        after = balance(rank_loads(total, new, ep_size))[1]
        if after > before * (1 - self.settings.min_gain):
            return None
        update = PlacementUpdate(version + 1, new.phy2log.tolist(), before, after, time.time())
        await redis.set(streams.placement_key(*key), encode(update))
        self.log.info(json.dumps({"event": "placement_published", "role": key[0], "group": key[1],
                                  "version": update.version, "max_mean_before": round(before, 4),
                                  "max_mean_after": round(after, 4)}))
        return update
