"""Expert parallelism in one process: EP 1, 2 and 4 ranks, each a model holding only its slice of
the routed experts and an engine of its own (data-parallel attention), exchanging tokens through
the in-process transport at every MoE layer, every rank on its own compute thread."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from modelcheck import packed_logits
from reference import load_reference, reference_greedy

from shared.engine.engine import Engine, EngineConfig
from shared.engine.sequence import SamplingParams
from shared.ep.eplb import initial_placement
from shared.ep.group import EPGroup, GroupMismatch
from shared.ep.moe import (
    apply_expert_parallel,
    base_owners,
    idle_forward,
    keep_tensor,
    local_experts,
    member_owners,
)
from shared.ep.overlap import Overlap, Tracer
from shared.ep.transport import InProcessHub, RedisTransport
from shared.ep.wire import dequantize_fp8, quantize_fp8
from shared.model.config import ModelArgs
from shared.model.loader import load_model

LENGTHS = [3, 17, 40, 64, 90, 130, 7, 55]
MAX_TOKENS = 10


class Rank:
    """One EP rank: its model slice, engine, group handle and compute thread."""

    def __init__(self, path, rank: int, size: int, placement, wire: str):
        layers = list(range(1, 1 + len(placement)))  # tiny: layer 0 dense, layers 1-2 MoE (3: the MTP layer's)
        self.model = load_model(path, dtype="fp32", keep=keep_tensor(local_experts(placement, layers, rank, size)))
        self.moes = apply_expert_parallel(self.model, rank, size, placement, lambda *a: self.group.exchange(*a),
                                          wire)
        self.engine = Engine(self.model, EngineConfig(kv_cache_bytes=16 << 20))
        self.engine.on_idle_step = lambda: idle_forward(self.model)
        self.thread = ThreadPoolExecutor(1)
        self.group: EPGroup | None = None


async def make_ranks(path, size: int, wire: str = "exact", redundant: int = 0, overlap: bool = False,
                     trace_dir=None, redis_url: str | None = None) -> list[Rank]:
    """EP ranks in this process, exchanging in process, or over Redis streams when given a URL."""
    placement = initial_placement(16, 16 + redundant, ModelArgs.from_file(path / "config.json").num_kv_layers - 1)
    ranks = [Rank(path, r, size, placement, wire) for r in range(size)]
    loop = asyncio.get_running_loop()
    if redis_url is None:
        hub = InProcessHub(size, timeout_s=60)
        transports = [hub.transport(r) for r in range(size)]
    else:
        group_id = f"test-{size}-{redundant}-{overlap}"
        transports = [RedisTransport(redis_url, "decode", r, size, group_id, timeout_s=60) for r in range(size)]
    await asyncio.gather(*[t.start() for t in transports])
    for r, (rank, transport) in enumerate(zip(ranks, transports)):
        rank.group = EPGroup(transport, loop, timeout_s=60)
        if overlap:
            rank.tracer = Tracer(trace_dir / f"rank{r}.json" if trace_dir else None, r, "prefill")
            rank.engine.runner.overlap = Overlap(rank.group, rank.tracer)
            rank.engine.on_idle_step = rank.engine.runner.idle
    return ranks


async def step_ranks(ranks: list[Rank], out: dict[int, list[int]]) -> None:
    """One engine step on every rank at once, each on its compute thread; tokens appended to `out`."""
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*[loop.run_in_executor(r.thread, r.engine.step) for r in ranks])
    for deltas in results:
        for d in deltas:
            out[int(d.request_id)] += d.token_ids


async def run_group(ranks: list[Rank], prompts: list[list[int]]) -> dict[int, list[int]]:
    """Prompt i runs on rank i % size; every step all ranks step together."""
    for i, prompt in enumerate(prompts):
        ranks[i % len(ranks)].engine.add_request(str(i), prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while True:
        go = await asyncio.gather(*[r.group.begin_step(r.engine.has_unfinished()) for r in ranks])
        assert len(set(go)) == 1  # every rank sees the same answer
        if not go[0]:
            return out
        await step_ranks(ranks, out)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(41)
    return [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def ep1_tokens(tiny_fp32, prompts):
    engine = Engine(load_model(tiny_fp32, dtype="fp32"), EngineConfig(kv_cache_bytes=16 << 20))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    out = {i: [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for d in engine.step():
            out[int(d.request_id)] += d.token_ids
    return out


@pytest.mark.parametrize("size,redundant,over_redis", [(1, 0, False), (2, 0, False), (4, 0, False), (4, 4, False),
                                                       (2, 0, True), (4, 4, True)])
async def test_exact_wire_gives_ep1_tokens_and_transformers(tiny_fp32, prompts, ep1_tokens, size, redundant,
                                                            over_redis, redis_url):
    ranks = await make_ranks(tiny_fp32, size, "exact", redundant, redis_url=redis_url if over_redis else None)
    got = await run_group(ranks, prompts)
    assert got == ep1_tokens
    ref = load_reference(tiny_fp32)
    covered = 0
    for i, prompt in enumerate(prompts):
        expected = reference_greedy(ref, prompt, MAX_TOKENS)
        assert got[i][:expected.trusted] == expected.tokens[:expected.trusted]
        covered += expected.trusted
    assert covered >= 0.7 * MAX_TOKENS * len(prompts)
    # each rank holds only its slice of the routed experts, and tokens really crossed ranks
    expert_bytes = sum(p.numel() * 4 for p in load_model(tiny_fp32, dtype="fp32").model.layers[1].mlp.experts[0]
                       .parameters())
    for r, rank in enumerate(ranks):
        resident = sum(p.numel() * p.element_size() for moe in rank.moes for p in moe.experts.parameters())
        assert resident == 2 * (16 + redundant) // size * expert_bytes
        untouched = [p for name, p in rank.model.named_parameters() if ".experts." in name]
        assert all(p.device.type == "cpu" for p in untouched)
        if size > 1:
            sent = sum(moe.dispatched for moe in rank.moes)
            assert all(sent[p] > 0 for p in range(size) if p != r), sent
            stats = rank.group.transport.stats
            assert all(stats.sent_bytes[p] > 0 for p in range(size) if p != r) and stats.sent_bytes[r] == 0
    await asyncio.gather(*[rank.group.transport.close() for rank in ranks])


@pytest.mark.parametrize("backend", ["loop", "sparse", "bmm", "weight-major", "native"])
async def test_every_moe_backend_gives_ep1_tokens_with_redundant_slots(tiny_fp32, prompts, ep1_tokens, backend):
    """EP 4 with 4 redundant slots, each rank on its own stack of slots, in each backend: the
    tokens of EP 1 (on the default grouped backend)."""
    ranks = await make_ranks(tiny_fp32, 4, "exact", 4)
    for rank in ranks:
        rank.model.set_moe_backend(backend)
        assert all(len(moe.stack) == 5 for moe in rank.moes)
    assert await run_group(ranks, prompts) == ep1_tokens
    await asyncio.gather(*[rank.group.transport.close() for rank in ranks])


async def test_a_rank_without_work_joins_with_zero_tokens(tiny_fp32, prompts, ep1_tokens):
    """Only rank 0 gets requests; rank 1 still steps (it computes its experts for rank 0)."""
    ranks = await make_ranks(tiny_fp32, 2, "exact")
    loop = asyncio.get_running_loop()
    for i, p in enumerate(prompts[:3]):
        ranks[0].engine.add_request(str(i), p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    out = {i: [] for i in range(3)}
    while await asyncio.gather(*[r.group.begin_step(r.engine.has_unfinished()) for r in ranks]) == [True, True]:
        results = await asyncio.gather(*[loop.run_in_executor(r.thread, r.engine.step) for r in ranks])
        assert results[1] == []
        for d in results[0]:
            out[int(d.request_id)] += d.token_ids
    assert out == {i: ep1_tokens[i] for i in range(3)}
    assert sum(moe.dispatched[1] for moe in ranks[0].moes) > 0


def fp8_roundtrip_reference(model):
    """EP 1 with the fp8 wire's rounding applied by hand: routed experts see their inputs after an
    e4m3 round trip (one scale per token per 128 channels) and their outputs after a bf16 one
    (through each expert's module: the `loop` backend)."""
    model.set_moe_backend("loop")
    for block in model.model.layers[1:]:
        for expert in block.mlp.experts:
            original = expert.forward

            def forward(x, original=original):
                q, s = quantize_fp8(x)
                return original(dequantize_fp8(q, s, x.dtype)).to(torch.bfloat16).to(x.dtype)
            expert.forward = forward
    return model


async def test_fp8_wire_is_exactly_its_rounding(tiny_fp32, prompts):
    """EP 2 on the fp8 wire equals EP 1 with the same rounding done by hand (so the wire adds no
    other error), and its logits stay within the tolerance that rounding implies of exact."""
    ranks = await make_ranks(tiny_fp32, 2, "fp8")
    loop = asyncio.get_running_loop()
    halves = [prompts[0::2], prompts[1::2]]
    logits = await asyncio.gather(*[loop.run_in_executor(r.thread, packed_logits, r.model, h)
                                    for r, h in zip(ranks, halves)])
    exact = load_model(tiny_fp32, dtype="fp32")
    rounded = fp8_roundtrip_reference(load_model(tiny_fp32, dtype="fp32"))
    for half, got in zip(halves, logits):
        want_rounded = packed_logits(rounded, half)
        want_exact = packed_logits(exact, half)
        for g, r, e in zip(got, want_rounded, want_exact):
            assert (g - r).abs().max() < 1e-4
            # NOTE: the tolerance. e4m3 keeps 3 mantissa bits: a round trip errs by at most 2^-4
            # of a value on the routed experts' inputs (bf16 adds 2^-8 on their outputs), so each
            # MoE layer perturbs the residual stream by at most ~2^-4 of its routed branch; over
            # the tiny model's 2 MoE layers the logits may drift up to 2 x 2^-4 = 12.5% (RMS,
            # relative). Measured: about 5%. The wire itself adds nothing (the check above).
            rel = (g - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt()
            assert 0 < rel < 2 * 2 ** -4, rel


@pytest.mark.parametrize("size", [2, 4])
async def test_overlap_on_gives_the_same_tokens(tiny_fp32, prompts, ep1_tokens, size):
    ranks = await make_ranks(tiny_fp32, size, "exact", overlap=True)
    assert await run_group(ranks, prompts) == ep1_tokens


async def test_overlap_trace_shows_communication_under_the_other_micro_batch(tiny_fp32, prompts, tmp_path):
    """A prefill step of two long prompts per rank: while one micro-batch's dispatch or combine
    is on the wire, the compute thread runs the other micro-batch's stages."""
    import json

    ranks = await make_ranks(tiny_fp32, 2, "exact", overlap=True, trace_dir=tmp_path)
    gen = torch.Generator().manual_seed(2)
    long_prompts = [torch.randint(3, 1024, (700,), generator=gen).tolist() for _ in range(4)]
    await run_group(ranks, long_prompts)
    for rank in ranks:
        rank.tracer.flush()
    events = json.loads((tmp_path / "rank0.json").read_text())["traceEvents"]
    compute = [e for e in events if e["tid"] == "compute"]
    comm = [e for e in events if e["tid"] == "communication"]
    assert {e["args"]["mb"] for e in compute} == {0, 1} and comm
    names = {e["name"].split(" ")[0] for e in compute}
    assert {"ATTN-0", "ATTN-1", "SHARED", "MLP"} <= names

    def overlapped(a, b):
        return a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]

    hidden = [(c, k) for c in comm for k in compute
              if c["args"]["mb"] != k["args"]["mb"] and overlapped(c, k) and k["dur"] > 0]
    assert hidden, "no communication of one micro-batch ran under the other's compute"


async def test_a_placement_rollout_while_requests_run_changes_nothing_they_see(tiny_fp32, prompts, ep1_tokens):
    """EPLB's placement, computed from the load the ranks routed so far, is staged in the
    background on every rank while steps go on, and taken by all at the same step: the greedy
    tokens are EP 1's, and the experts new to a rank were read from the checkpoint."""
    from shared.ep.eplb import rebalance_experts
    from shared.ep.rollout import Rollout

    ranks = await make_ranks(tiny_fp32, 2, "exact", redundant=2)
    rollouts = [Rollout(tiny_fp32, torch.float32, r.moes) for r in ranks]
    loop = asyncio.get_running_loop()
    for i, prompt in enumerate(prompts):
        ranks[i % 2].engine.add_request(str(i), prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    out = {i: [] for i in range(len(prompts))}
    staging, new, switched_at = None, None, []
    while True:
        go = await asyncio.gather(*[r.group.begin_step(r.engine.has_unfinished(), ro.staged_version)
                                    for r, ro in zip(ranks, rollouts)])
        agreed = {r.group.agreed_version for r in ranks}
        assert len(agreed) == 1
        for r, ro in zip(ranks, rollouts):
            if r.group.agreed_version > ro.version:
                assert await loop.run_in_executor(r.thread, ro.switch, r.group.agreed_version)
                switched_at.append(r.group.step)
        if not go[0]:
            break
        await step_ranks(ranks, out)
        if ranks[0].group.step == 3:  # the load so far decides the new placement
            load = sum(torch.stack([m.expert_load for m in r.moes]) for r in ranks).numpy()
            new = rebalance_experts(load, 18, 4, 1, 2).phy2log.tolist()
            assert new != rollouts[0].placement()
            staging = [asyncio.create_task(asyncio.to_thread(ro.stage, 1, new)) for ro in rollouts]
    await asyncio.gather(*staging)
    assert out == ep1_tokens
    assert len(set(switched_at)) == 1 and len(switched_at) == 2  # both ranks, the same step
    assert all(ro.version == 1 and ro.placement() == new for ro in rollouts)
    assert sum(ro.num_experts_read for ro in rollouts) > 0


def test_members_keep_their_slots_and_share_the_dead_ranks_evenly():
    assert base_owners(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert member_owners(8, 4, [0, 1, 2, 3]) == base_owners(8, 4)
    assert member_owners(8, 4, [0, 2, 3]) == [0, 0, 0, 2, 2, 2, 3, 3]  # rank 1's two slots: to 0, then 2
    assert member_owners(9, 3, [2]) == [2] * 9
    owners = member_owners(20, 4, [1, 3])
    assert [owners.count(r) for r in range(4)] == [0, 10, 0, 10]
    assert owners[5:10] == [1] * 5 and owners[15:] == [3] * 5
    with pytest.raises(ValueError):
        member_owners(8, 4, [])
    # what a rank's loader reads follows the owners map
    assert local_experts([[0, 1, 2, 3, 0, 1, 2, 3]], [1], 0, 4, [0, 2, 3]) == {1: {0, 1, 2}}


async def test_a_group_re_formed_without_a_rank_gives_ep1_tokens(tiny_fp32, prompts, ep1_tokens):
    """EP 4 with redundant slots loses rank 1 after three steps: the other three re-form (epoch
    1), each reads its share of rank 1's experts from the checkpoint, and their requests go on to
    EP 1's tokens; a rank out of the group is sent nothing, and an EPLB placement staged for the
    old owners is dropped."""
    from shared.ep.rollout import Rollout

    ranks = await make_ranks(tiny_fp32, 4, "exact", redundant=4)
    rollouts = [Rollout(tiny_fp32, torch.float32, r.moes) for r in ranks]
    survivors = [0, 2, 3]
    mine = {i: survivors[i % 3] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        ranks[mine[i]].engine.add_request(str(i), prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    out = {i: [] for i in range(len(prompts))}
    group = ranks
    while True:
        go = await asyncio.gather(*[r.group.begin_step(r.engine.has_unfinished()) for r in group])
        if not go[0]:
            break
        await step_ranks(group, out)
        if group is ranks and ranks[0].group.step == 3:  # rank 1 dies; the others re-form
            await ranks[1].group.transport.close()
            group = [ranks[r] for r in survivors]
            owners = [member_owners(16 + 4, 4, survivors) for _ in range(2)]
            for r in survivors:
                # an EPLB placement staged just before (or landing while) the group re-forms
                await asyncio.to_thread(rollouts[r].stage, 1, [row[1:] + row[:1] for row in rollouts[r].placement()])
                assert rollouts[r].staged_version == 1
                staged = await asyncio.to_thread(rollouts[r].stage_members, rollouts[r].placement(), owners)
                rollouts[r].switch_members(0, rollouts[r].placement(), owners, staged)
                ranks[r].group.reform(1, survivors)
                # it holds the experts of the old owners' slots: reported as not staged, never switched to
                assert rollouts[r].staged_version == 0 and rollouts[r].is_staging_free
                assert not rollouts[r].switch(1)
            await asyncio.gather(*[r.group.transport.start() for r in group])
            sent_to_1 = [sum(int(m.dispatched[1]) for m in r.moes) for r in group]
    assert out == ep1_tokens
    assert [sum(int(m.dispatched[1]) for m in r.moes) for r in group] == sent_to_1
    assert all(rollouts[r].num_experts_read > 0 for r in survivors)
    for r in survivors:  # its own slots and its share of rank 1's
        assert [len(m.experts) for m in ranks[r].moes] == [member_owners(20, 4, survivors).count(r)] * 2
    await asyncio.gather(*[r.group.transport.close() for r in group])


async def test_the_balancer_publishes_a_better_placement_from_reported_load(redis):
    """Two intervals of skewed reports from a 2-rank group -> a placement whose max/mean rank
    load on that window is lower; nothing new while a rank still computes with the old one."""
    import logging

    from services.balancer.expert_lb import EPLBSettings, ExpertBalancer
    from shared.protocol import streams
    from shared.protocol.messages import ExpertLoad, PlacementUpdate
    from shared.protocol.wire import decode, encode

    balancer = ExpertBalancer(EPLBSettings(window=4, min_tokens=100), logging.getLogger("test"))
    skew = [[1000 if e < 3 else 10 for e in range(16)]] * 2  # experts 0-2 (all on rank 0) are hot

    async def report(scale: int, version: int = 0):
        for rank in range(2):
            counts = [[c * scale // 2 for c in row] for row in skew]
            await redis.set(streams.expert_load_key("decode", "g", rank),
                            encode(ExpertLoad("decode", "g", rank, 2, 18, 4, version, counts)))

    await report(1)
    assert await balancer.tick(redis) == []  # the first look only sets the baseline
    await report(2)
    (update,) = await balancer.tick(redis)
    assert update.version == 1 and update.max_mean_after < update.max_mean_before
    stored = decode(await redis.get(streams.placement_key("decode", "g")), PlacementUpdate)
    assert stored.phy2log == update.phy2log and all(sorted(set(row)) == list(range(16)) for row in stored.phy2log)
    await report(3)  # the ranks still report version 0: a rollout is under way
    assert await balancer.tick(redis) == []


@pytest.mark.parametrize("ep_nodes,published", [("2", ["even"]), ("2,odd=1", ["even", "odd"])])
async def test_a_group_the_node_count_does_not_fit_is_skipped_and_the_others_go_on(redis, caplog, ep_nodes,
                                                                                   published):
    """--ep-nodes 2 cannot split a 3-rank group: that group is skipped with a warning, while a
    4-rank group (two ranks per node) still gets its placement; given its own count
    (`2,odd=1`), the 3-rank group gets one too."""
    import logging

    from services.balancer.expert_lb import EPLBSettings, ExpertBalancer
    from shared.ep.eplb import NodeCounts
    from shared.protocol import streams
    from shared.protocol.messages import ExpertLoad
    from shared.protocol.wire import encode

    balancer = ExpertBalancer(EPLBSettings(window=4, min_tokens=100, ep_nodes=NodeCounts.parse(ep_nodes)),
                              logging.getLogger("test"))
    skew = [[1000 if e in (0, 1, 4, 5) else 10 for e in range(16)]] * 2  # hot in expert groups 0 and 1

    async def report(scale: int):
        for group, size, slots in (("even", 4, 20), ("odd", 3, 18)):
            for rank in range(size):
                counts = [[c * scale // size for c in row] for row in skew]
                await redis.set(streams.expert_load_key("decode", group, rank),
                                encode(ExpertLoad("decode", group, rank, size, slots, 4, 0, counts)))

    await report(1)
    await balancer.tick(redis)
    await report(2)
    with caplog.at_level(logging.WARNING):
        updates = await balancer.tick(redis)
    assert len(updates) == len(published)
    for group in ("even", "odd"):
        assert await redis.exists(streams.placement_key("decode", group)) == (group in published)
    assert any("eplb_skipped" in r.message for r in caplog.records) == (published == ["even"])


def test_ep_nodes_values():
    from shared.ep.eplb import NodeCounts

    assert NodeCounts.parse("4").of("decode") == 4
    counts = NodeCounts.parse("decode=18, prefill=4")
    assert (counts.of("decode"), counts.of("prefill"), counts.of("g1")) == (18, 4, 1)
    assert NodeCounts.parse("2,decode=18").of("prefill") == 2
    assert NodeCounts.parse(str(counts)) == counts
    for bad, why in (("0", "'0' is neither"), ("decode=x", "'decode=x' is neither"), ("=3", "'=3' is neither"),
                     ("2,3", "two counts for every group"), ("a=1,a=2", "group 'a' is given twice"), ("", "neither")):
        with pytest.raises(ValueError, match=why):
            NodeCounts.parse(bad)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "services.balancer", "--ep-nodes", "decode=0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "argument --ep-nodes: 'decode=0': each part is" in done.stderr, done.stderr


async def test_ep_ranks_speculate_through_the_exchange(tiny_mtp, prompts):
    """EP 2, exact wire, N = 2: the verify steps' tokens cross ranks like any others, and so do the
    MTP layer's (its experts split between the ranks like a main layer's; two calls a step, the
    second named apart); a rank without drafts joins with zero tokens. Transformers' tokens."""
    ranks = await make_ranks(tiny_mtp, 2, "exact")
    for rank in ranks:
        assert rank.model.mtp is not None and len(rank.model.mtp.mlp.stack) == 8  # half of the MTP layer's experts
        rank.engine = Engine(rank.model, EngineConfig(kv_cache_bytes=16 << 20, speculative_tokens=2))
        rank.engine.on_idle_step = lambda model=rank.model: idle_forward(model)
        rank.group.mtp_calls = rank.engine.mtp_calls
    got = await run_group(ranks, prompts[:3])  # rank 1 finishes first, then joins idle
    ref = load_reference(tiny_mtp)
    for i, prompt in enumerate(prompts[:3]):
        expected = reference_greedy(ref, prompt, MAX_TOKENS)
        assert got[i][:expected.trusted] == expected.tokens[:expected.trusted]
    for r, rank in enumerate(ranks):
        assert rank.engine.spec.num_drafts > 0 and rank.engine.blocks.num_free == rank.engine.blocks.num_blocks
        assert rank.model.mtp.mlp.dispatched[1 - r] > 0  # the MTP layer's tokens crossed ranks
    # ranks running the MTP layer a different number of times a step are told which flag to align
    ranks[1].group.mtp_calls = 3
    with pytest.raises(GroupMismatch, match="--speculative-tokens"):
        await asyncio.gather(*[r.group.begin_step(True) for r in ranks])
    await asyncio.gather(*[rank.group.transport.close() for rank in ranks])
