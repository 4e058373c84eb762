"""MLA's batched attention against a dense float64 softmax, and the engine's step indices against a
plain per-sequence computation.

Legend: T = tokens of the step, L = a context, H = heads, C = kv_lora_rank, R = rope dim."""
from __future__ import annotations

import contextlib

import pytest
import torch

from shared.engine.runner import ModelRunner
from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import SamplingParams, Sequence
from shared.model.attention import MLA, AttentionBatch, choose_absorbed
from shared.model.config import ModelArgs
from shared.model.kv_cache import LatentKVPool, plan_reads
from shared.model.model import DeepseekV3
from shared.model.presets import preset_config

RTOL = 1e-4  # of the largest output: fp32 rounding through several matmuls (seen up to 1.2e-5, its size
# varying with the kernels the CPU picks), far below any masking or rescaling mistake (1e-2 and up)
ROWS = 200  # small decode buckets, so a step's decodes already span several


@pytest.fixture(scope="module")
def args() -> ModelArgs:
    return ModelArgs.from_dict(preset_config("tiny", "fp32"))


@pytest.fixture(scope="module")
def mla(args) -> MLA:
    torch.manual_seed(0)
    return MLA(args, layer=0).eval()


def reference(mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, contexts: list[torch.Tensor],
              query_lens: list[int]) -> torch.Tensor:
    """Each sequence alone, in float64, as the dense absorbed formula: q_nope [T, H, N], q_pe [T, H, R],
    contexts[i] [L, C+R] -> [T, D]."""
    c = mla.kv_lora_rank
    w = mla.kv_b_proj.weight.double().view(mla.num_heads, mla.nope_dim + mla.v_dim, c)
    w_uk, w_uv = w[:, :mla.nope_dim], w[:, mla.nope_dim:]
    outs, start = [], 0
    for t, context in zip(query_lens, contexts):
        ctx, length = context.double(), context.shape[0]
        q_latent = torch.einsum("thn,hnc->thc", q_nope[start:start + t].double(), w_uk)
        q = torch.cat([q_latent, q_pe[start:start + t].double()], dim=-1)  # [t, H, C+R]
        scores = torch.einsum("thc,lc->htl", q, ctx) * mla.scale
        visible = torch.arange(length)[None, :] <= torch.arange(t)[:, None] + (length - t)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        o_latent = torch.einsum("htl,lc->thc", probs, ctx[:, :c])
        outs.append(torch.einsum("thc,hvc->thv", o_latent, w_uv).reshape(t, -1))
        start += t
    return torch.cat(outs) @ mla.o_proj.weight.double().T


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours.double() - ref).abs().max().item()
    assert err <= RTOL * ref.abs().max().item(), f"max |diff| {err:.2e} vs max |ref| {ref.abs().max().item():.2e}"


def random_step(args: ModelArgs, query_lens: list[int], context_lens: list[int], seed: int = 0):
    """A pool of random latents, each sequence's context on scattered slots, and random queries.
    -> pool, per sequence slots [L], q_nope [T, H, N], q_pe [T, H, R], new kv [T, C+R]."""
    gen = torch.Generator().manual_seed(seed)
    width = args.kv_cache_dim
    num_slots = sum(context_lens) + 37
    pool = LatentKVPool(args, num_slots, torch.float32)
    pool.kv.normal_(generator=gen)
    order = torch.randperm(num_slots, generator=gen)
    slots = list(order[:sum(context_lens)].split(context_lens))
    total = sum(query_lens)
    heads = args.num_attention_heads
    q_nope = 3 * torch.randn(total, heads, args.qk_nope_head_dim, generator=gen)  # peaked softmax: errors show
    q_pe = 3 * torch.randn(total, heads, args.qk_rope_head_dim, generator=gen)
    return pool, slots, q_nope, q_pe, torch.randn(total, width, generator=gen)


DECODE_LENS = [1, 64, 65, 2, 323, 63, 128, 193, 1, 700, 60, 60]


@pytest.mark.parametrize("decode_rows", [ROWS, None], ids=["small-buckets", "default"])
def test_grouped_decode_matches_dense_softmax(args, mla, decode_rows):
    n = len(DECODE_LENS)
    pool, slots, q_nope, q_pe, kv = random_step(args, [1] * n, DECODE_LENS)
    rows = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True)
    plan = plan_reads([1] * n, DECODE_LENS, [True] * n, rows, **({} if decode_rows is None else {"decode_rows": ROWS}))
    assert plan.decode and not plan.padded
    sizes = sorted(g.num_seqs for g in plan.decode)
    # longest first, padded to at most 1.25x their own rows: 700 and 323 alone; within 200 rows
    # [65, 64, 63] is the largest bucket, else [65, 64, 63, 60, 60, 2]
    assert (sizes[-1], len(plan.decode)) == ((3, 8) if decode_rows else (6, 5)), sizes
    assert any(g.mask is None and g.num_seqs > 1 for g in plan.decode)  # equal lengths: no mask
    batch = AttentionBatch([1] * n, DECODE_LENS, [True] * n, plan=plan)
    with torch.inference_mode():
        ours = mla.attend(q_nope, q_pe, kv, batch, pool)
    close(ours, reference(mla, q_nope, q_pe, [pool.kv[0, s] for s in slots], [1] * n))


def bf16_counting_kernel_calls(args, mla, pool, native_plan, monkeypatch) -> tuple[MLA, list[int]]:
    """A bf16 copy of `mla` on `native_plan`, the pool in bf16, and the list that records the sequence
    count of each native.decode_attention call from now on."""
    from shared.model import native

    low = MLA(args, layer=0).eval()
    low.load_state_dict(mla.state_dict())
    low = low.bfloat16()
    low.native_plan = native_plan
    pool.kv = pool.kv.bfloat16()
    calls = []
    attend = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a, **k: calls.append(a[0].shape[0]) or attend(*a, **k))
    return low, calls


def test_native_plan_decodes_every_bucket_in_one_call(args, mla, monkeypatch):
    """On a `native` plan (bf16) the step's decode buckets go to the kernel as one
    (ReadPlan.decode_in_one: each context padded with its last row to the longest, its own length
    kept), and the output is the dense softmax's within bf16 rounding."""
    from shared.model.experts import MoEPlan

    n = len(DECODE_LENS)
    pool, slots, q_nope, q_pe, kv = random_step(args, [1] * n, DECODE_LENS)
    rows = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True)
    plan = plan_reads([1] * n, DECODE_LENS, [True] * n, rows, decode_rows=ROWS)
    assert len(plan.decode) == 8
    merged = plan.decode_in_one
    assert merged.num_seqs == n and merged.max_context == max(DECODE_LENS)
    by_row = dict(zip(merged.rows.tolist(), merged.lengths.tolist()))
    assert by_row == dict(enumerate(DECODE_LENS))
    table = merged.slots.view(n, -1)
    for i, row in enumerate(merged.rows.tolist()):
        length = DECODE_LENS[row]
        assert torch.equal(table[i, :length], slots[row]) and (table[i, length:] == slots[row][-1]).all()
    low, calls = bf16_counting_kernel_calls(args, mla, pool, MoEPlan.parse("native"), monkeypatch)
    batch = AttentionBatch([1] * n, DECODE_LENS, [True] * n, plan=plan)
    with torch.inference_mode():
        ours = low.attend(q_nope.bfloat16(), q_pe.bfloat16(), kv.bfloat16(), batch, pool)
    assert calls == [n]  # one call for the 8 buckets
    # every row a decode, in row order: the queries are read and the outputs written as they lie,
    # the same numbers as through the index copies of a step with other rows
    assert plan.decodes_only and torch.equal(merged.rows, torch.arange(n))
    with torch.inference_mode():
        copied = low._decode_in_place(q_nope.bfloat16(), q_pe.bfloat16(), merged, pool.layer_rows(0))
        assert torch.equal(low.o_proj(copied.reshape(n, -1)), ours)
    assert not plan_reads([1, 3], [5, 3], [True, False], torch.arange(20).view(2, 10)).decodes_only
    want = reference(low, q_nope.bfloat16(), q_pe.bfloat16(), [pool.kv[0, s] for s in slots], [1] * n)
    err = (ours.double() - want).abs().max().item()
    assert err <= 3e-2 * want.abs().max().item(), err  # bf16 rounding; a wrong row or length is O(1)


@pytest.mark.parametrize("plan_text, in_place", [("1:native,4:weight-major", True), ("weight-major", False)])
def test_a_plan_with_native_attends_in_place_at_every_count(args, mla, monkeypatch, plan_text, in_place):
    """A plan with `native` at some count reads the decodes' contexts in place at every count, the
    counts it gives another backend included (set_moe_backend's MLA.native_plan); a plan without
    `native` gathers them for SDPA."""
    from shared.model.experts import MoEPlan

    n = len(DECODE_LENS)  # past the plan's native count
    pool, slots, q_nope, q_pe, kv = random_step(args, [1] * n, DECODE_LENS)
    plan = plan_reads([1] * n, DECODE_LENS, [True] * n, torch.nn.utils.rnn.pad_sequence(slots, batch_first=True),
                      decode_rows=ROWS)
    moe_plan = MoEPlan.parse(plan_text)
    assert moe_plan.choose(n) == "weight-major"
    low, calls = bf16_counting_kernel_calls(args, mla, pool, moe_plan if "native" in moe_plan.backends else None,
                                            monkeypatch)  # as DeepseekV3.set_moe_backend sets MLA.native_plan
    batch = AttentionBatch([1] * n, DECODE_LENS, [True] * n, plan=plan)
    with torch.inference_mode():
        ours = low.attend(q_nope.bfloat16(), q_pe.bfloat16(), kv.bfloat16(), batch, pool)
    assert calls == ([n] if in_place else [])
    want = reference(low, q_nope.bfloat16(), q_pe.bfloat16(), [pool.kv[0, s] for s in slots], [1] * n)
    err = (ours.double() - want).abs().max().item()
    assert err <= 3e-2 * want.abs().max().item(), err


MIXED = [  # (query_len, context_len, absorbed): cached prefixes, whole prompts and decodes in one step
    (1, 90, True), (5, 12, False), (1, 1, True), (3, 70, True), (7, 7, False), (4, 4, True),
    (1, 130, True), (64, 200, False), (20, 20, False), (2, 300, True)]


@pytest.mark.parametrize("max_padding", [1.0, float("inf")], ids=["unpadded-buckets", "one-bucket-per-path"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_step_matches_per_sequence_attention(args, mla, seed, max_padding):
    query_lens, context_lens, absorbed = (list(x) for x in zip(*MIXED))
    pool, slots, q_nope, q_pe, kv = random_step(args, query_lens, context_lens, seed)
    rows = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True)
    plan = plan_reads(query_lens, context_lens, absorbed, rows, max_padding=max_padding)
    batch = AttentionBatch(query_lens, context_lens, absorbed, plan=plan)
    assert plan.decode and {g.is_absorbed for g in plan.padded} == {False, True}
    assert max(g.num_seqs for g in plan.padded) == (1 if max_padding == 1 else 4)
    with torch.inference_mode():
        ours = mla.attend(q_nope, q_pe, kv, batch, pool)
    close(ours, reference(mla, q_nope, q_pe, [pool.kv[0, s] for s in slots], query_lens))


def test_the_default_plan_batches_sequences_of_one_shape(args):
    query_lens, context_lens = [5, 9, 5, 1, 5, 9], [5, 30, 5, 7, 12, 30]
    slots = [torch.arange(n) for n in context_lens]
    plan = AttentionBatch(query_lens, context_lens, [False] * 6, context_slots=slots).plan
    rows = [list(range(a, b)) for a, b in [(0, 5), (5, 14), (14, 19), (19, 20), (20, 25), (25, 34)]]
    want = [rows[0] + rows[2], rows[1] + rows[5], rows[3], rows[4]]
    assert sorted(g.token_rows.tolist() for g in plan.padded) == want


@pytest.mark.parametrize("max_padding", [1.0, float("inf")], ids=["unpadded-buckets", "one-bucket"])
@pytest.mark.parametrize("absorbed", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("query_lens", [[33, 1, 7, 64, 7], [16, 16, 16]], ids=["ragged", "equal"])
def test_cache_free_prefill_matches_per_sequence_attention(args, mla, absorbed, query_lens, max_padding):
    _, _, q_nope, q_pe, kv = random_step(args, query_lens, query_lens)
    paths = [absorbed] * len(query_lens)
    batch = AttentionBatch(query_lens, query_lens, paths, plan=plan_reads(query_lens, query_lens, paths, None,
                                                                           max_padding=max_padding))
    with torch.inference_mode():
        ours = mla.attend(q_nope, q_pe, kv, batch, None)
    close(ours, reference(mla, q_nope, q_pe, list(kv.split(query_lens)), query_lens))


def test_a_cached_context_needs_a_cache(args, mla):
    pool, slots, q_nope, q_pe, kv = random_step(args, [1], [5])
    with pytest.raises(ValueError, match="needs a cache"):
        mla.attend(q_nope, q_pe, kv, AttentionBatch([1], [5], [True], context_slots=slots), None)
    with pytest.raises(ValueError, match="without a cache needs context_len == query_len"):
        AttentionBatch([1], [5], [True])


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every way the forward could read a device value back (or build a tensor from host data) raises."""
    def refuse(name):
        def method(*a, **k):
            raise AssertionError(f"host synchronisation in the forward: {name}")
        return method

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__index__", "__float__"):
            m.setattr(torch.Tensor, name, refuse(name))
        m.setattr(torch, "tensor", refuse("torch.tensor"))
        m.setattr(torch, "nonzero", refuse("torch.nonzero"))
        get_item = torch.Tensor.__getitem__

        def getitem(self, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                raise AssertionError("host synchronisation in the forward: boolean-mask indexing")
            return get_item(self, index)

        m.setattr(torch.Tensor, "__getitem__", getitem)
        yield


def test_the_forward_reads_nothing_back_from_the_device(args, mla, monkeypatch):
    query_lens, context_lens, absorbed = (list(x) for x in zip(*MIXED))
    pool, slots, q_nope, q_pe, kv = random_step(args, query_lens, context_lens)
    batch = AttentionBatch(query_lens, context_lens, absorbed, context_slots=slots)
    x = torch.randn(sum(query_lens), mla.o_proj.out_features)
    cos = torch.ones(sum(query_lens), mla.rope_dim // 2)
    prefill = AttentionBatch.prefill(query_lens, absorbed=True)
    with torch.inference_mode(), no_host_reads(monkeypatch):
        mla.attend(q_nope, q_pe, kv, batch, pool)
        mla.forward(x, cos, 0 * cos, prefill)
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="host synchronisation"):
        q_nope.sum().item()  # the guard itself works


# -- the engine's step indices ------------------------------------------------------------------------
def sequence(name: str, num_tokens: int, num_computed: int, table: list[int]) -> Sequence:
    seq = Sequence(name, list(range(100, 100 + num_tokens)), SamplingParams(), arrival=0)
    seq.num_computed, seq.block_table = num_computed, table
    return seq


def test_runner_inputs_match_per_sequence_slots_and_positions(args):
    torch.manual_seed(0)
    runner = ModelRunner(DeepseekV3(args), num_blocks=16, block_size=64)
    scheduled = [  # num_new: a prefill over a cached block, decodes at and across block edges, a fresh prompt
        ScheduledSeq(sequence("a", 150, 64, [7, 3, 9]), 86, True),
        ScheduledSeq(sequence("b", 71, 70, [2, 5]), 1, True),
        ScheduledSeq(sequence("c", 40, 0, [11]), 40, False),
        ScheduledSeq(sequence("d", 129, 128, [4, 0, 6, 8]), 1, True),
        ScheduledSeq(sequence("e", 64, 63, [12]), 1, True),
        ScheduledSeq(sequence("f", 300, 200, [1, 13, 14, 15, 10]), 100, True),
    ]
    ids, positions, batch = runner.inputs(scheduled)

    want_ids, want_positions, want_slots, contexts = [], [], [], []
    for item in scheduled:
        seq, start = item.seq, item.seq.num_computed
        end = start + item.num_new
        slots = [seq.block_table[p // 64] * 64 + p % 64 for p in range(end)]
        want_ids += seq.token_ids[start:end]
        want_positions += list(range(start, end))
        want_slots += slots[start:end]
        contexts.append(slots)
    assert ids.tolist() == want_ids
    assert positions.tolist() == want_positions
    assert batch.slot_mapping.tolist() == want_slots
    assert batch.context_lens == [len(c) for c in contexts]
    assert batch.absorbed == [choose_absorbed(args, item.num_new, len(c)) for item, c in zip(scheduled, contexts)]
    assert read_back(batch) == contexts


def read_back(batch: AttentionBatch) -> list[list[int]]:
    """Each sequence's context slots as the plan lays them out (decode buckets, padded buckets)."""
    plan, starts = batch.plan, [sum(batch.query_lens[:i]) for i in range(len(batch.query_lens))]
    by_row: dict[int, list[int]] = {}
    for d in plan.decode:
        slots = d.slots.view(d.num_seqs, d.max_context)
        real = torch.ones_like(slots, dtype=torch.bool) if d.mask is None else d.mask.view(d.num_seqs, -1)
        for r in range(d.num_seqs):
            by_row[d.rows[r].item()] = slots[r][real[r]].tolist()
    for bucket in plan.padded:
        rows, members = bucket.token_rows.tolist(), []
        while len(rows) > sum(batch.query_lens[i] for i in members):  # the bucket's sequences, in its order
            members.append(starts.index(rows[sum(batch.query_lens[i] for i in members)]))
        for i, part in zip(members, bucket.context_rows.split([batch.context_lens[i] for i in members])):
            by_row[starts[i]] = part.tolist()
    return [by_row[s] for s in starts]
