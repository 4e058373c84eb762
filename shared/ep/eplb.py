"""Expert-parallel load balancer (EPLB): which logical expert each physical expert slot holds.

Pure numpy, written from the algorithm DeepSeek describes for EPLB (shared/ep/README.md, "EPLB"):
hot experts get redundant replicas and the replicas are packed so that every rank receives about
the same load. Slots are GPU-major: slot s lives on rank s // (num_replicas // num_gpus).

Letter legend for shape comments: L = MoE layers, E = logical experts, P = physical slots
(num_replicas), X = the largest replica count of any expert, G = ranks (GPUs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.launcher.cliargs import FlagValueError


@dataclass(frozen=True, eq=False)
class Placement:
    """Where every logical expert lives. NOTE: log2phy rows list replicas in replica order."""
    phy2log: np.ndarray  # [L, P] logical expert held by each physical slot
    log2phy: np.ndarray  # [L, E, X] physical slots of each logical expert, padded with -1
    logcnt: np.ndarray  # [L, E] number of replicas of each logical expert (>= 1)

    @property
    def num_replicas(self) -> int:
        return self.phy2log.shape[1]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items into num_packs packs of exactly n // num_packs items each, heaviest item
    first into the lightest pack that still has room (ties: the lowest pack index; equal items:
    the lower item index first). Returns (pack of each item, position of the item in its pack)."""
    n = weight.shape[0]
    per_pack = n // num_packs
    if per_pack == 1:  # one item per pack: every assignment is equally balanced; keep the order
        return np.arange(n), np.zeros(n, dtype=np.int64)
    pack_of = np.empty(n, dtype=np.int64)
    rank_in_pack = np.empty(n, dtype=np.int64)
    pack_load = np.zeros(num_packs)
    pack_items = np.zeros(num_packs, dtype=np.int64)
    for item in np.argsort(-weight, kind="stable"):
        pack = int(np.argmin(np.where(pack_items < per_pack, pack_load, np.inf)))
        pack_of[item], rank_in_pack[item] = pack, pack_items[pack]
        pack_load[pack] += weight[item]
        pack_items[pack] += 1
    return pack_of, rank_in_pack


def _replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow each row of `weight` [R, n] from n experts to num_phy slots: slot i < n holds expert
    i, and each extra slot goes to the expert with the largest load per replica (ties: lowest id).
    Returns phy2log [R, num_phy], the replica rank of each slot [R, num_phy], counts [R, n]."""
    rows, n = weight.shape
    phy2log = np.tile(np.arange(num_phy), (rows, 1))
    replica = np.zeros((rows, num_phy), dtype=np.int64)
    count = np.ones((rows, n), dtype=np.int64)
    row_ids = np.arange(rows)
    for slot in range(n, num_phy):
        hottest = np.argmax(weight / count, axis=1)  # [R]
        phy2log[:, slot] = hottest
        replica[:, slot] = count[row_ids, hottest]
        count[row_ids, hottest] += 1
    return phy2log, replica, count


def _place_layer(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                 num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hierarchical policy for one layer: groups onto nodes, replicas within each node,
    replicas onto the node's GPUs. Returns phy2log [P], replica rank of each slot [P], logcnt [E]."""
    num_logical = weight.shape[0]
    group_size = num_logical // num_groups
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_replicas // num_nodes
    slots_per_gpu = num_replicas // num_gpus
    # 1. whole groups onto nodes; node-local order: a node's groups in packing order, then ids
    node_of_group, rank_of_group = _balanced_packing(weight.reshape(num_groups, -1).sum(1), num_nodes)
    group_order = np.argsort(node_of_group * (num_groups // num_nodes) + rank_of_group)
    local2log = (group_order[:, None] * group_size + np.arange(group_size)).ravel()  # [E]
    node_weight = weight[local2log].reshape(num_nodes, experts_per_node)
    # 2. redundant replicas inside each node
    slot2local, replica, local_count = _replicate(node_weight, slots_per_node)
    # 3. each node's replicas onto its GPUs, by load per replica
    phy2log = np.empty(num_replicas, dtype=np.int64)
    phy_replica = np.empty(num_replicas, dtype=np.int64)
    for node in range(num_nodes):
        per_replica = (node_weight[node] / local_count[node])[slot2local[node]]
        gpu, position = _balanced_packing(per_replica, num_gpus // num_nodes)
        target = node * slots_per_node + gpu * slots_per_gpu + position
        phy2log[target] = local2log[node * experts_per_node + slot2local[node]]
        phy_replica[target] = replica[node]
    logcnt = np.empty(num_logical, dtype=np.int64)
    logcnt[local2log] = local_count.ravel()
    return phy2log, phy_replica, logcnt


def _placement(phy2log: np.ndarray, replica: np.ndarray, logcnt: np.ndarray) -> Placement:
    """Build log2phy from phy2log and the replica rank of every slot."""
    num_layers, num_replicas = phy2log.shape
    width = int(logcnt.max())
    log2phy = np.full((num_layers, logcnt.shape[1], width), -1, dtype=np.int64)  # [L, E, X]
    layer_ids = np.repeat(np.arange(num_layers), num_replicas)
    log2phy[layer_ids, phy2log.ravel(), replica.ravel()] = np.tile(np.arange(num_replicas), num_layers)
    return Placement(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> Placement:
    """EPLB placement for `weight` [L, E] (per-expert load, e.g. token counts). Hierarchical
    policy (groups kept whole on one node) when num_groups % num_nodes == 0, otherwise the global
    policy (the same routine with one group on one node)."""
    weight = np.asarray(weight, dtype=np.float64)
    _require(weight.ndim == 2 and weight.size > 0,
             f"weight must be a non-empty [layers, experts] array, got shape {weight.shape}")
    _require(bool(np.all(np.isfinite(weight)) and np.all(weight >= 0)),
             "weight must hold finite, non-negative loads")
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        _require(isinstance(value, (int, np.integer)) and value >= 1, f"{name}={value!r} must be an integer >= 1")
    num_layers, num_logical = weight.shape
    _require(num_replicas >= num_logical,
             f"num_replicas={num_replicas} is below the {num_logical} logical experts: every expert needs a slot")
    _require(num_replicas % num_gpus == 0,
             f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}: give every rank equal slots")
    _require(num_gpus % num_nodes == 0,
             f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}: give every node equal ranks")
    _require(num_logical % num_groups == 0,
             f"{num_logical} logical experts do not split into num_groups={num_groups} equal groups")
    if num_groups % num_nodes != 0:
        num_groups = num_nodes = 1  # global policy
    layers = [_place_layer(weight[i], num_replicas, num_groups, num_nodes, num_gpus) for i in range(num_layers)]
    return _placement(*(np.stack(parts) for parts in zip(*layers)))


def identity_placement(num_logical: int, num_replicas: int, num_gpus: int, num_layers: int = 1) -> Placement:
    """The placement before any statistics: slot s holds expert s % num_logical, so experts sit in
    order and the extra slots hold round-robin copies of experts 0, 1, ..."""
    _require(num_logical >= 1, f"num_logical={num_logical} must be >= 1")
    _require(num_replicas >= num_logical,
             f"num_replicas={num_replicas} is below the {num_logical} logical experts: every expert needs a slot")
    _require(num_gpus >= 1 and num_replicas % num_gpus == 0,
             f"num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}: give every rank equal slots")
    _require(num_layers >= 1, f"num_layers={num_layers} must be >= 1")
    slots = np.arange(num_replicas)
    phy2log = np.tile(slots % num_logical, (num_layers, 1))
    replica = np.tile(slots // num_logical, (num_layers, 1))
    logcnt = np.tile(np.bincount(slots % num_logical, minlength=num_logical), (num_layers, 1))
    return _placement(phy2log, replica, logcnt)


def placement_from_phy2log(phy2log, num_logical: int) -> Placement:
    """The Placement a phy2log [L, P] describes (replicas numbered in slot order)."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    _require(phy2log.ndim == 2 and phy2log.size > 0, f"phy2log must be [layers, slots], got {phy2log.shape}")
    logcnt = np.stack([np.bincount(row, minlength=num_logical) for row in phy2log])
    _require(bool(np.all(logcnt >= 1)), "every logical expert needs at least one slot")
    replica = np.zeros_like(phy2log)
    for layer, row in enumerate(phy2log):
        seen = np.zeros(num_logical, dtype=np.int64)
        for slot, expert in enumerate(row):
            replica[layer, slot] = seen[expert]
            seen[expert] += 1
    return _placement(phy2log, replica, logcnt)


def rank_loads(weight, placement: Placement, num_gpus: int) -> np.ndarray:
    """Load each rank receives [L, G]: every expert's load split evenly over its replicas."""
    weight = np.asarray(weight, dtype=np.float64)
    phy2log = placement.phy2log
    _require(weight.shape == placement.logcnt.shape,
             f"weight shape {weight.shape} does not match the placement's {placement.logcnt.shape}")
    _require(num_gpus >= 1 and phy2log.shape[1] % num_gpus == 0,
             f"num_gpus={num_gpus} does not divide the {phy2log.shape[1]} slots")
    per_slot = np.take_along_axis(weight / placement.logcnt, phy2log, axis=1)  # [L, P]
    return per_slot.reshape(phy2log.shape[0], num_gpus, -1).sum(axis=2)


def balance(loads) -> tuple[np.ndarray, float]:
    """max/mean rank load of each layer of `loads` [L, G] (1.0 for a layer without load), and
    the mean of those ratios over layers."""
    loads = np.asarray(loads, dtype=np.float64)
    _require(loads.ndim == 2, f"loads must be [layers, ranks], got shape {loads.shape}")
    mean = loads.mean(axis=1)
    ratio = np.divide(loads.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)
    return ratio, float(ratio.mean())


def choose_replica(placement: Placement, layer: int, logical_ids, offset: int = 0) -> np.ndarray:
    """Physical slot for each routed expert id in `logical_ids` (any shape, e.g. [T, K]). The
    k-th occurrence of expert e (row-major order) goes to replica (k + offset) % logcnt[e], so a
    batch splits evenly (within one) over an expert's replicas. Ranks that route independently
    should pass different offsets (e.g. their rank) so their first tokens do not share a replica."""
    ids = np.asarray(logical_ids, dtype=np.int64)
    num_logical = placement.logcnt.shape[1]
    _require(0 <= layer < placement.phy2log.shape[0], f"layer={layer} is outside the placement's layers")
    if ids.size and (ids.min() < 0 or ids.max() >= num_logical):
        raise ValueError(f"logical_ids must lie in [0, {num_logical}), got values {ids.min()}..{ids.max()}")
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    sorted_ids = flat[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if flat.size else np.array([], int)
    run_start = np.repeat(starts, np.diff(np.r_[starts, flat.size]))
    occurrence = np.empty_like(flat)
    occurrence[order] = np.arange(flat.size) - run_start
    replica = (occurrence + offset) % placement.logcnt[layer, flat]
    return placement.log2phy[layer, flat, replica].reshape(ids.shape)


class LoadWindow:
    """Per-expert token counts of the last `num_intervals` intervals (a moving window): add one
    [L, E] array per interval; total() sums the window. Integer counts sum exactly."""

    def __init__(self, num_intervals: int):
        _require(num_intervals >= 1, f"num_intervals={num_intervals} must be >= 1")
        self.num_intervals = num_intervals
        self.num_added = 0
        self._ring: np.ndarray | None = None  # [num_intervals, L, E], allocated on the first add

    def add(self, counts) -> None:
        """Record one interval's counts [L, E]; the oldest interval drops out once the window is full."""
        counts = np.asarray(counts)
        if self._ring is None:
            _require(counts.ndim == 2, f"counts must be [layers, experts], got shape {counts.shape}")
            dtype = np.int64 if counts.dtype.kind in "iub" else np.float64
            self._ring = np.zeros((self.num_intervals, *counts.shape), dtype=dtype)
        _require(counts.shape == self._ring.shape[1:],
                 f"counts shape {counts.shape} differs from the window's {self._ring.shape[1:]}")
        self._ring[self.num_added % self.num_intervals] = counts
        self.num_added += 1

    def total(self) -> np.ndarray:
        """Sum of the intervals in the window [L, E] (a copy); raises before the first add."""
        _require(self._ring is not None, "LoadWindow.total() before any add(): no shape known yet")
        return self._ring.sum(axis=0)


class NodeCountError(FlagValueError):
    """A bad `--ep-nodes` value (argparse words it as the flag's error; the environment path too)."""


@dataclass(frozen=True)
class NodeCounts:
    """How many nodes each EP group spans, for EPLB's hierarchical policy: one count for every
    group, or one per group id (`--ep-group-id`, by default the group's role), e.g.
    `decode=18,prefill=4`, or a default and exceptions, `1,decode=18`. Groups not named take the
    default (1 if none is given)."""

    default: int = 1
    by_group: tuple[tuple[str, int], ...] = ()

    def of(self, group_id: str) -> int:
        return dict(self.by_group).get(group_id, self.default)

    def __str__(self) -> str:
        return ",".join([str(self.default)] + [f"{g}={n}" for g, n in self.by_group])

    @classmethod
    def parse(cls, text: str) -> NodeCounts:
        default, by_group = None, {}
        for part in str(text).split(","):
            name, eq, count = part.strip().rpartition("=")
            name = name.strip()
            count = count.strip()
            if not (count.isascii() and count.isdigit()) or int(count) < 1 or (eq and not name):
                raise NodeCountError(f"{text!r}: each part is a node count >= 1 (every group) or GROUP=COUNT, "
                                     f"e.g. 4, or decode=18,prefill=4; {part.strip()!r} is neither")
            if not eq:
                if default is not None:
                    raise NodeCountError(f"{text!r}: two counts for every group ({default} and {count})")
                default = int(count)
            elif name in by_group:
                raise NodeCountError(f"{text!r}: group {name!r} is given twice")
            else:
                by_group[name] = int(count)
        return cls(1 if default is None else default, tuple(sorted(by_group.items())))


def initial_placement(num_experts: int, num_slots: int, num_moe_layers: int) -> list[list[int]]:
    """Before any load statistics: experts in order, extra slots as round-robin copies."""
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    return [[s % num_experts for s in range(num_slots)] for _ in range(num_moe_layers)]
