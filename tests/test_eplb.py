"""EPLB: the README example exactly, placement invariants on skewed loads, and the helpers."""
from __future__ import annotations

import numpy as np
import pytest

from shared.ep.eplb import (
    LoadWindow,
    Placement,
    balance,
    choose_replica,
    identity_placement,
    rank_loads,
    rebalance_experts,
)

# EPLB's README example (shared/ep/README.md): 2 layers, 12 experts in 4 groups, 16 slots, 2 nodes x 4 GPUs
README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def zipf_loads(seed: int, num_layers: int, num_experts: int, tokens: int = 4096, s: float = 1.2) -> np.ndarray:
    """Token counts [L, E] from a Zipf(s) popularity whose hot experts differ by layer."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_experts + 1) ** s
    popularity /= popularity.sum()
    return np.stack([rng.multinomial(tokens, popularity[rng.permutation(num_experts)]) for _ in range(num_layers)])


def check_invariants(p: Placement, weight, num_groups: int, num_nodes: int, num_gpus: int, hierarchical: bool):
    num_layers, num_logical = np.shape(weight)
    num_replicas = p.phy2log.shape[1]
    assert p.phy2log.shape == (num_layers, num_replicas) and p.logcnt.shape == (num_layers, num_logical)
    assert num_replicas % num_gpus == 0  # every rank has num_replicas // num_gpus slots
    assert (p.logcnt >= 1).all() and (p.logcnt.sum(axis=1) == num_replicas).all()
    assert p.log2phy.shape == (num_layers, num_logical, p.logcnt.max())
    for layer in range(num_layers):
        assert (np.bincount(p.phy2log[layer], minlength=num_logical) == p.logcnt[layer]).all()
        for expert in range(num_logical):
            count = p.logcnt[layer, expert]
            slots = p.log2phy[layer, expert]
            assert (slots[count:] == -1).all()
            assert sorted(slots[:count]) == np.flatnonzero(p.phy2log[layer] == expert).tolist()
        if hierarchical:
            node_of_slot = np.arange(num_replicas) // (num_replicas // num_nodes)
            group_of_slot = p.phy2log[layer] // (num_logical // num_groups)
            for group in range(num_groups):
                assert len(set(node_of_slot[group_of_slot == group])) == 1, f"group {group} spans nodes"
            for node in range(num_nodes):
                assert len(set(group_of_slot[node_of_slot == node])) == num_groups // num_nodes


def test_readme_example_exact():
    p = rebalance_experts(README_WEIGHT, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert p.phy2log.tolist() == README_PHY2LOG
    # layer 0: the heaviest experts of each node (5, 4 and 10, 1) are the duplicated ones
    assert p.logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert p.log2phy[0, 5].tolist() == [0, 2] and p.log2phy[0, 0].tolist() == [12, -1]
    check_invariants(p, README_WEIGHT, 4, 2, 8, hierarchical=True)


def test_readme_example_balances_ranks():
    p = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    loads = rank_loads(README_WEIGHT, p, 8)
    assert loads.sum(axis=1).tolist() == README_WEIGHT.sum(axis=1).astype(float).tolist()
    after, _ = balance(loads)
    before, _ = balance(rank_loads(README_WEIGHT, identity_placement(12, 16, 8, num_layers=2), 8))
    assert (after < before).all()


SHAPES = [  # (experts, groups, nodes, gpus, replicas, hierarchical)
    (64, 8, 2, 4, 80, True),  # the small preset, EP4 over 2 nodes, 16 redundant
    (64, 8, 1, 4, 80, True),
    (256, 8, 4, 32, 288, True),  # DeepSeek-V3 prefill: EP32 over 4 nodes, 32 redundant
    (64, 8, 3, 6, 96, False),  # 8 groups on 3 nodes: global policy
    (256, 8, 1, 144, 288, True),  # decode EP144: 2 slots per rank
    (16, 4, 1, 4, 16, True),  # no redundancy: packing only
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}-g{}-n{}-G{}-P{}".format(*s[:5]))
@pytest.mark.parametrize("seed", [0, 1])
def test_skewed_loads_keep_invariants_and_balance(shape, seed):
    num_logical, num_groups, num_nodes, num_gpus, num_replicas, hierarchical = shape
    weight = zipf_loads(seed, 3, num_logical, tokens=64 * num_logical)
    p = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    check_invariants(p, weight, num_groups, num_nodes, num_gpus, hierarchical)
    # without redundancy where the experts split evenly over the ranks, else round-robin copies
    baseline_slots = num_logical if num_logical % num_gpus == 0 else num_replicas
    baseline = identity_placement(num_logical, baseline_slots, num_gpus, num_layers=3)
    after, after_mean = balance(rank_loads(weight, p, num_gpus))
    before, before_mean = balance(rank_loads(weight, baseline, num_gpus))
    assert after_mean < before_mean
    assert (after <= before + 1e-12).all()
    np.testing.assert_allclose(rank_loads(weight, p, num_gpus).sum(axis=1), weight.sum(axis=1))


def test_global_policy_is_the_single_group_single_node_case():
    weight = zipf_loads(3, 2, 64)
    a = rebalance_experts(weight, 96, num_groups=8, num_nodes=3, num_gpus=6)
    b = rebalance_experts(weight, 96, num_groups=1, num_nodes=1, num_gpus=6)
    assert a.phy2log.tolist() == b.phy2log.tolist()


def test_replicas_go_to_the_largest_load_per_replica():
    # one expert holds 90% of the load: it takes every extra slot, and each rank gets one replica of it
    weight = np.array([[900, 25, 25, 25, 25]])
    p = rebalance_experts(weight, 10, 1, 1, 5)
    assert p.logcnt.tolist() == [[6, 1, 1, 1, 1]]
    assert all(0 in p.phy2log[0, 2 * r:2 * r + 2] for r in range(5))


def test_identity_placement():
    p = identity_placement(4, 6, 3, num_layers=2)
    assert p.phy2log.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert p.logcnt.tolist() == [[2, 2, 1, 1]] * 2
    assert p.log2phy[0].tolist() == [[0, 4], [1, 5], [2, -1], [3, -1]]
    loads = rank_loads([[8, 4, 2, 2]], identity_placement(4, 6, 3), 3)
    assert loads.tolist() == [[6.0, 4.0, 6.0]]  # slots hold 4, 2 | 2, 2 | 4, 2
    ratio, mean = balance(loads)
    assert ratio.tolist() == [6.0 / (16 / 3)] and mean == 6.0 / (16 / 3)


def test_balance_of_an_idle_layer_is_one():
    ratio, mean = balance([[0, 0], [3, 1]])
    assert ratio.tolist() == [1.0, 1.5] and mean == 1.25


@pytest.mark.parametrize("args, match", [
    ((README_WEIGHT, 10, 4, 2, 8), "num_replicas=10 is below the 12"),
    ((README_WEIGHT, 18, 4, 2, 8), "num_replicas=18 is not a multiple of num_gpus=8"),
    ((README_WEIGHT, 16, 4, 3, 8), "num_gpus=8 is not a multiple of num_nodes=3"),
    ((README_WEIGHT, 16, 5, 2, 8), "num_groups=5"),
    ((README_WEIGHT, 16, 4, 0, 8), "num_nodes=0"),
    ((README_WEIGHT, 16.0, 4, 2, 8), "num_replicas=16.0"),
    ((README_WEIGHT[0], 16, 4, 2, 8), r"shape \(12,\)"),
    ((-README_WEIGHT, 16, 4, 2, 8), "non-negative"),
    ((np.full((1, 12), np.nan), 16, 4, 2, 8), "finite"),
])
def test_rebalance_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args)


def test_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_replicas=3 is below"):
        identity_placement(4, 3, 1)
    with pytest.raises(ValueError, match="num_gpus=4"):
        identity_placement(4, 6, 4)
    p = identity_placement(4, 4, 2)
    with pytest.raises(ValueError, match="does not match"):
        rank_loads([[1, 2, 3]], p, 2)
    with pytest.raises(ValueError, match=r"\[0, 4\), got values 0..4"):
        choose_replica(p, 0, [0, 4])
    with pytest.raises(ValueError, match="layer=1"):
        choose_replica(p, 1, [0])


def test_choose_replica_spreads_evenly():
    p = identity_placement(3, 8, 2)  # expert 0 on slots 0, 3, 6; expert 1 on 1, 4, 7; expert 2 on 2, 5
    ids = np.array([[0, 1], [0, 2], [0, 1], [0, 2], [0, 1], [0, 2], [0, 1]])  # [T=7, K=2]
    slots = choose_replica(p, 0, ids)
    assert slots.shape == ids.shape and (p.phy2log[0, slots] == ids).all()
    assert slots[:, 0].tolist() == [0, 3, 6, 0, 3, 6, 0]  # 7 tokens of expert 0: 3, 2, 2
    assert slots[:, 1].tolist() == [1, 2, 4, 5, 7, 2, 1]
    assert choose_replica(p, 0, ids, offset=1)[:, 0].tolist() == [3, 6, 0, 3, 6, 0, 3]
    assert choose_replica(p, 0, np.zeros((0, 2), dtype=int)).shape == (0, 2)


def test_choose_replica_is_even_on_skewed_routing():
    weight = zipf_loads(7, 1, 64)
    p = rebalance_experts(weight, 80, 8, 2, 4)
    rng = np.random.default_rng(0)
    ids = rng.choice(64, size=(2048, 6), p=weight[0] / weight[0].sum())
    per_slot = np.bincount(choose_replica(p, 0, ids).ravel(), minlength=80)
    for expert in range(64):
        used = per_slot[p.log2phy[0, expert, :p.logcnt[0, expert]]]
        assert used.max() - used.min() <= 1


def test_load_window_sums_the_last_intervals_exactly():
    window = LoadWindow(3)
    with pytest.raises(ValueError, match="before any add"):
        window.total()
    intervals = [np.full((2, 4), 10**12 + i, dtype=np.int64) + np.arange(4) for i in range(5)]
    window.add(intervals[0])
    window.add(intervals[1])
    assert (window.total() == intervals[0] + intervals[1]).all()
    for counts in intervals[2:]:
        window.add(counts)
    assert window.total().dtype == np.int64
    assert (window.total() == intervals[2] + intervals[3] + intervals[4]).all()
    assert window.num_added == 5
    with pytest.raises(ValueError, match=r"counts shape \(2, 3\)"):
        window.add(np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="num_intervals=0"):
        LoadWindow(0)
