"""Issue #15: streamoe's own bf16 CPU kernels (shared/model/native.py) and the `native` MoE backend:
each output within one bf16 rounding of the float64 result, the model on a `native` plan as close
to its fp32 self as on torch's kernels, and refusals that name what is missing."""
from __future__ import annotations

import json
import platform

import pytest
import torch
import torch.nn.functional as F
from modelcheck import incremental_logits

from shared.model import native
from shared.model.experts import ExpertStack, MoEPlan, check_supported, combine, expert_counts, run_experts
from shared.model.loader import load_model
from shared.model.norm import RMSNorm

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def two_threads():
    """The kernels split their rows over torch's threads: test the split."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def builds() -> list:
    """The kernels as built for this CPU, and the paths of older instruction sets it also runs:
    plain C (-march=x86-64) and AVX-512 without BF16 (-march=skylake-avx512), whatever CI's CPU."""
    libs = [native.library()]
    if platform.machine() == "x86_64":
        libs.append(native.build("x86-64"))
        if {"avx512f", "avx512bw", "avx512vl"} <= set(native.cpu_id().rsplit("|", 1)[-1].split()):
            libs.append(native.build("skylake-avx512"))
    return libs


def test_the_builds_cover_each_path_the_cpu_runs():
    kinds = [native.kind(lib) for lib in builds()]
    assert kinds[0] in ("avx512-bf16", "avx512", "c")
    if platform.machine() == "x86_64":
        assert kinds[1] == "c" and (len(kinds) == 2 or kinds[2] == "avx512")
        # the fp32 loops: AVX2 with FMA where the CPU has them (x86-64-v3 and up), and plain C
        flags = set(native.cpu_id().rsplit("|", 1)[-1].split())
        assert [native.f32_kind(lib) for lib in builds()[:2]] == ["avx2" if {"avx2", "fma"} <= flags else "c", "c"]


def within_one_rounding(got: torch.Tensor, want: torch.Tensor, terms: int, inputs: torch.Tensor | float = 0.0) -> bool:
    """got (bf16) is want (float64) rounded to bf16, give or take fp32 accumulation over `terms` and
    `inputs`, what rounding the inputs can move it by."""
    slack = 2.0 ** -8 * want.abs() + 1e-6 * terms ** 0.5 * want.abs().max() + inputs
    return bool(((got.double() - want).abs() <= slack).all())


@pytest.mark.parametrize("n,k", [(96, 64), (37, 100), (130, 17)])  # K not a multiple of 16: the masked tail
def test_linear_is_the_float64_product_rounded_once(n, k):
    gen = torch.Generator().manual_seed(n)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    wide = torch.randn(native.LINEAR_ROWS, 2 * k + 1, generator=gen).bfloat16()
    for lib in builds():
        # one pass, then several; from 16 rows outer products (AVX512-BF16), by 16 rows and 64
        for m in [*range(1, native.MAX_ROWS + 1), 9, 16, 17, 33, native.LINEAR_ROWS]:
            for x in (wide[:m, :k].contiguous(), wide[:m, k + 1:]):  # contiguous; an odd row stride and offset
                got = native.linear(x, weight, lib)
                assert got.shape == (m, n) and got.dtype == torch.bfloat16
                assert within_one_rounding(got, x.double() @ weight.double().T, k), (native.kind(lib), m, x.stride())


@pytest.mark.parametrize("rows", [1, 7, 13, native.F32_LINEAR_ROWS])
def test_fp32_linear_is_the_float64_product_within_fp32_accumulation(rows):
    """fp32 rows on the fp32 loops (AVX2 where built for it, and plain C): groups of up to 5 rows, 2-8
    weight rows a block and the rest one by one (N = 37), K not a multiple of 8, strided rows."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(37, 83, generator=gen)
    x = torch.randn(rows, 2 * 83, generator=gen)[:, ::2]  # a row stride past K, channels strided: made contiguous
    want = x.double() @ weight.double().T
    for lib in builds():
        got = native.linear(x, weight, lib)
        assert got.dtype == torch.float32 and got.shape == (rows, 37)
        assert ((got.double() - want).abs() <= 1e-6 * want.abs().max()).all(), native.f32_kind(lib)


def test_linear_refuses_what_it_does_not_take_naming_it():
    weight = torch.randn(8, 16).bfloat16()
    for x, w in ((torch.randn(native.LINEAR_ROWS + 1, 16).bfloat16(), weight), (torch.randn(2, 16), weight),
                 (torch.randn(native.F32_LINEAR_ROWS + 1, 16), weight.float()),
                 (torch.randn(2, 16).half(), weight.half()),
                 (torch.randn(2, 8).bfloat16(), torch.randn(16, 8).bfloat16().T)):
        assert not native.supports(x, w)
        with pytest.raises(ValueError, match=r"native\.linear: x \("):
            native.linear(x, w)


def test_heads_and_rms_norm_are_the_float64_results_rounded():
    """native.heads on strided views (as MLA hands it W_UV inside kv_b_proj) against float64; native.rms_norm
    against norm.RMSNorm's own arithmetic (fp32 statistics, the normalised row rounded, then scaled)."""
    gen = torch.Generator().manual_seed(7)
    heads = 3
    for n, k in ((20, 40), (70, 9), (16, 600)):  # outputs past a block of 16 and of 64; odd K; K past 512
        packed_from = torch.randn(heads, n + 5, k + 3, generator=gen).bfloat16()
        weight = packed_from[:, 5:, :k]  # a strided view, as MLA's W_UK and W_UV inside kv_b_proj
        packed = native.pack_heads(weight)
        for lib in builds():
            for m in (1, 5, 11, 64):  # blocks of 6 rows, and the last short
                x = torch.randn(m, heads, k + 2, generator=gen).bfloat16()[..., 1:k + 1]
                out = torch.zeros(m, heads, n + 4, dtype=torch.bfloat16)
                got = native.heads(x, packed, n, out=out[..., 2:n + 2], lib=lib)
                want = torch.einsum("mhk,hnk->mhn", x.double(), weight.double())
                assert within_one_rounding(got, want, k), (native.kind(lib), m, n, k)
                assert (out[..., :2] == 0).all() and (out[..., n + 2:] == 0).all()  # nothing written outside
    with pytest.raises(ValueError, match="native.heads"):
        native.heads(torch.randn(2, heads, k), packed, n)
    k = 40

    norm = RMSNorm(k, eps=1e-5)
    norm.weight.data = torch.randn(k, generator=gen).bfloat16()
    rows = torch.randn(6, 2 * k, generator=gen).bfloat16()[:, 3:k + 3]  # a row stride, as kv_a_layernorm's input
    h = rows.float()
    want = norm.weight.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16().double()
    for lib in builds():
        got = native.rms_norm(rows, norm.weight, 1e-5, lib)
        assert within_one_rounding(got, want, k), native.kind(lib)
    assert within_one_rounding(norm(rows), want, k)  # torch's operators
    norm.native_rows = frozenset({6})  # the module through the kernel
    assert within_one_rounding(norm(rows), want, k)
    with pytest.raises(ValueError, match="native.rms_norm"):
        native.rms_norm(rows.float(), norm.weight, 1e-5)


def test_mlp_and_the_residual_norm_are_torchs_bf16_steps_in_one_call():
    """native.mlp against `linear` and torch's bf16 silu and mul (the silu's exp may move a rounding: at
    most one bf16 step, rarely), its `add` as torch adds bf16 to the bit; native.add_rms_norm against
    torch's bf16 sum and rms_norm of it, to the bit."""
    gen = torch.Generator().manual_seed(11)
    dim, inter = 40, 24
    gate, up = (torch.randn(inter, dim, generator=gen).bfloat16() for _ in range(2))
    down = torch.randn(dim, inter, generator=gen).bfloat16()
    for lib in builds():
        for m in (1, 5, 17, native.LINEAR_ROWS):
            x = torch.randn(m, dim + 3, generator=gen).bfloat16()[:, 2:dim + 2]  # rows with a stride
            h = F.silu(native.linear(x, gate, lib)) * native.linear(x, up, lib)
            want = native.linear(h, down, lib)
            got = native.mlp(x, gate, up, down, lib=lib)
            step = 2.0 ** -7 * want.float().abs() + 1e-30
            assert ((got.float() - want.float()).abs() <= step).all(), (native.kind(lib), m)
            assert (got == want).float().mean() >= 0.98, (native.kind(lib), m)
            routed = torch.randn(m, dim, generator=gen).bfloat16()
            assert torch.equal(native.mlp(x, gate, up, down, add=routed, lib=lib), routed + got), (native.kind(lib), m)

            r = torch.randn(m, dim, generator=gen).bfloat16()
            weight = torch.randn(dim, generator=gen).bfloat16()
            total, normed = native.add_rms_norm(x, r, weight, 1e-5, lib)
            assert torch.equal(total, x + r) and torch.equal(normed, native.rms_norm(x + r, weight, 1e-5, lib))
    with pytest.raises(ValueError, match="native.mlp"):
        native.mlp(x, gate, up, down.T)
    with pytest.raises(ValueError, match="native.add_rms_norm"):
        native.add_rms_norm(x, r.float(), weight, 1e-5)


def test_store_rows_is_index_copy():
    """The new cache rows into their slots as LatentKVPool.store's index_copy_ puts them: slots given as
    a strided int32 view too; a slot outside the pool refused, nothing written."""
    gen = torch.Generator().manual_seed(5)
    pool = torch.randn(50, 36, generator=gen).bfloat16()
    rows = torch.randn(6, 40, generator=gen).bfloat16()[:, 2:38]  # a row stride
    slots = torch.tensor([[7, 0], [49, 0], [3, 0], [20, 0], [8, 0], [31, 0]], dtype=torch.int32)[:, 0]
    for lib in builds():
        want, got = pool.clone().index_copy_(0, slots.long(), rows), pool.clone()
        native.store_rows(got, slots, rows, lib)
        assert torch.equal(got, want), native.kind(lib)
        with pytest.raises(ValueError, match="a slot outside 0..49"):
            native.store_rows(got, slots + 1, rows, lib)
        assert torch.equal(got, want)


def test_moe_is_the_torch_routing_and_combine_bit_for_bit():
    """native.moe (sort, experts, combine in one call) against the steps MoE.routed_grouped takes in torch
    around native.experts: equal to the bit, for one token, a few, and all tokens on few experts."""
    gen = torch.Generator().manual_seed(11)
    slots, dim, inter, top_k = 12, 64, 32, 4
    stack = ExpertStack(torch.randn(slots, 2 * inter, dim, generator=gen).mul(0.1).bfloat16(),
                        torch.randn(slots, dim, inter, generator=gen).mul(0.1).bfloat16())
    for tokens, pool in ((1, slots), (5, slots), (33, top_k)):  # the last: every token on the same 4 experts
        x = torch.randn(tokens, dim, generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=gen)
        order = ids.flatten().argsort(stable=True)
        rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
        for lib in builds():  # each build's own expert loops (they differ in how they round the intermediate)
            for packed in {None, native.pack_experts(stack.w13, stack.w2, lib)}:  # and the tiles (AVX512-BF16)
                ys = native.experts(x.index_select(0, order // top_k), expert_counts(ids, slots), stack.w13, stack.w2,
                                    lib, packed=packed)
                want = combine(ys, rows.view(ids.shape), ids, weights).to(torch.bfloat16)
                load = torch.arange(slots)
                got = native.moe(x, ids, weights, stack.w13, stack.w2, load=load, lib=lib, packed=packed)
                assert torch.equal(got, want), (tokens, native.kind(lib), packed is None)
                assert torch.equal(load, torch.arange(slots) + expert_counts(ids, slots))  # the pairs added
    # the order of the sum: slot 1 is slot 0 negated and large, so slots 0 and 1 cancel exactly when added
    # first (slot order) and leave fp32 rounding of their size behind when slot 2 comes between them
    loud = ExpertStack(stack.w13.clone(), stack.w2.clone())
    loud.w2[0] *= 512
    loud.w13[1], loud.w2[1] = loud.w13[0], -loud.w2[0]
    x = torch.randn(2, dim, generator=gen).bfloat16()
    ids = torch.tensor([[0, 2, 1, 3], [2, 1, 3, 0]])
    weights = torch.tensor([[0.5, 0.3, 0.5, 0.2], [0.3, 0.5, 0.2, 0.5]])
    order = ids.flatten().argsort(stable=True)
    rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    ys = native.experts(x.index_select(0, order // top_k), expert_counts(ids, slots), loud.w13, loud.w2)
    want = combine(ys, rows.view(ids.shape), ids, weights).to(torch.bfloat16)
    assert torch.equal(native.moe(x, ids, weights, loud.w13, loud.w2), want)
    with pytest.raises(RuntimeError, match="out of range"):
        native.moe(x, ids + slots, weights, stack.w13, stack.w2)
    with pytest.raises(ValueError, match="native.moe"):
        native.moe(x, ids, weights.double(), stack.w13, stack.w2)
    with pytest.raises(ValueError, match="not pack_experts of stacks of 12 slots"):
        native.moe(x, ids, weights, stack.w13, stack.w2, packed=(stack.w13, stack.w2))


def test_gate_chooses_the_experts_torch_chooses():
    """native.gate against moe.Gate's operators: the same experts for every token (group-limited, which
    differs from a plain top-k here), their weights within fp32 rounding, normalised or not."""
    from shared.model.config import ModelArgs
    from shared.model.moe import Gate
    from shared.model.presets import preset_config

    gen = torch.Generator().manual_seed(8)
    args = ModelArgs.from_dict({**preset_config("tiny"), "hidden_size": 80, "n_routed_experts": 32, "n_group": 4,
                                "topk_group": 2, "num_experts_per_tok": 5, "routed_scaling_factor": 2.5})
    for normalize in (True, False):
        gate = Gate(args)
        gate.norm_topk_prob = normalize
        with torch.no_grad():
            gate.weight.copy_(torch.randn(32, 80, generator=gen) * 0.1)
            gate.e_score_correction_bias.copy_(torch.randn(32, generator=gen) * 0.05)
        for tokens in (1, 6, 37):
            x = torch.randn(tokens, 80, generator=gen).bfloat16()
            want_weights, want_ids = gate(x)
            want_ids, order = want_ids.sort(dim=-1)
            want_weights = want_weights.gather(1, order)
            plain = (gate.scores(x) + gate.e_score_correction_bias).topk(5, dim=-1).indices.sort(dim=-1).values
            if tokens == 37:
                assert not torch.equal(plain, want_ids)  # the groups matter to this choice
            for lib in builds():
                weights, ids = native.gate(x, gate.weight, gate.e_score_correction_bias, 4, 2, 5, normalize, 2.5, lib)
                assert torch.equal(ids, want_ids), (tokens, native.kind(lib))
                assert torch.allclose(weights, want_weights, rtol=1e-6, atol=0), (tokens, native.kind(lib))
            gate.native_rows = frozenset({tokens})
            assert torch.equal(gate(x)[1], want_ids)
            gate.native_rows = frozenset()
    with pytest.raises(RuntimeError, match="equal groups"):
        native.gate(x, gate.weight, gate.e_score_correction_bias, 3, 2, 5, True, 1.0)
    with pytest.raises(ValueError, match="native.gate"):
        native.gate(x.float(), gate.weight, gate.e_score_correction_bias, 4, 2, 5, True, 1.0)


def test_rope_and_kv_rows_are_torchs_operators_bit_for_bit():
    """native.rope against rope.apply_rotary (a strided view of the query heads, both pair layouts) and
    native.kv_rows against MLA.project_kv's norm, rotation and concatenation: equal to the bit."""
    from shared.model.rope import apply_rotary

    gen = torch.Generator().manual_seed(9)
    tokens, heads, nope, rot, latent = 7, 3, 10, 8, 24
    q = torch.randn(tokens, heads, nope + rot, generator=gen).bfloat16()
    angles = torch.rand(tokens, rot // 2, generator=gen) * 40
    cos, sin = (angles.cos() * 1.3).bfloat16(), (angles.sin() * 1.3).bfloat16()
    q_pe = q[..., nope:]  # a view: rows and heads strided
    norm = RMSNorm(latent, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(latent, generator=gen) + 0.5)
    norm = norm.bfloat16()
    kv = torch.randn(tokens, latent + rot, generator=gen).bfloat16() * 3
    for interleave in (True, False):
        want = apply_rotary(q_pe, cos, sin, interleave)
        rows = torch.cat([norm(kv[:, :latent]), apply_rotary(kv[:, latent:], cos, sin, interleave)], dim=-1)
        for lib in builds():
            assert torch.equal(native.rope(q_pe, cos, sin, interleave, lib=lib), want), (interleave, native.kind(lib))
            got = native.kv_rows(kv, norm.weight, norm.eps, cos, sin, interleave, lib)
            assert torch.equal(got, rows), (interleave, native.kind(lib))
    with pytest.raises(ValueError, match="native.rope"):
        native.rope(q_pe.float(), cos, sin, True)


def reference_experts(xs: torch.Tensor, counts: torch.Tensor, stack: ExpertStack, round_act: bool) -> torch.Tensor:
    """Each pair through its slot's expert in float64; the intermediate rounded to bf16 as the kernel
    rounds it with bf16 dot products, else unrounded (its fp32)."""
    out, start, inter = [], 0, stack.w2.shape[2]
    for slot, n in enumerate(counts.tolist()):
        x = xs[start:start + n].double()
        h = x @ stack.w13[slot].double().T
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        if round_act:
            act = act.bfloat16().double()
        out.append(act @ stack.w2[slot].double().T)
        start += n
    return torch.cat(out)


def test_native_experts_match_the_float64_reference_pair_by_pair():
    """Empty slots, one pair, and a slot of 19 pairs (three passes of up to 8; in tiles two of up to 16) at
    once; with 4 slots in use on 2 threads each thread runs whole experts, with 2 the threads share each
    expert's rows. The
    stacks as they are, and (AVX512-BF16) packed in tiles, partial at both edges (I odd, D past 64)."""
    gen = torch.Generator().manual_seed(3)
    slots, dim, inter = 6, 80, 41
    stack = ExpertStack((torch.randn(slots, 2 * inter, dim, generator=gen) * 0.2).bfloat16(),
                        (torch.randn(slots, dim, inter, generator=gen) * 0.2).bfloat16())
    if native.kind() == "avx512-bf16":
        w13p, w2p = stack.packed_for_native()
        assert w13p.shape == (slots, 2, dim // 2, 64, 2) and w2p.shape == (slots, 2, 21, 64, 2)
        assert stack.packed_for_native()[0] is w13p  # made once per weight version
    for counts in (torch.tensor([0, 1, 19, 0, 5, 8]), torch.tensor([0, 0, 19, 0, 0, 3])):
        xs = torch.randn(int(counts.sum()), dim, generator=gen).bfloat16()
        got = run_experts("native", xs, counts, stack)
        assert got.dtype == torch.bfloat16 and got.shape == xs.shape
        assert torch.equal(got, native.experts(xs, counts, stack.w13, stack.w2, native.library(),
                                               packed=stack.packed_for_native()))
        for lib in builds():
            want = reference_experts(xs, counts, stack, round_act=native.kind(lib) == "avx512-bf16")
            got = native.experts(xs, counts, stack.w13, stack.w2, lib)
            assert within_one_rounding(got, want, dim + inter), (native.kind(lib), counts.tolist())
            packed = native.pack_experts(stack.w13, stack.w2, lib)
            assert (packed is None) == (native.kind(lib) != "avx512-bf16")
            if packed is not None:
                got = native.experts(xs, counts, stack.w13, stack.w2, lib, packed=packed)
                assert within_one_rounding(got, want, dim + inter), ("packed", counts.tolist())
    assert run_experts("native", xs[:0], torch.zeros(slots, dtype=torch.int64), stack).shape == (0, dim)


def test_fp32_experts_match_the_float64_reference_pair_by_pair():
    """The fp32 loops (AVX2 where built for it, and plain C): empty slots, one pair, a slot of 53 pairs
    (passes of 24, 24 and 5; groups of 5 and 4 rows against blocks of 2 weight rows, and the rows left
    over one by one), K not a multiple of 8 (the masked tail); with 4 slots in use on 2 threads each
    thread runs whole experts, with 2 the threads share each expert's rows. Within fp32 accumulation
    of the float64 result."""
    gen = torch.Generator().manual_seed(5)
    slots, dim, inter = 6, 83, 41
    stack = ExpertStack(torch.randn(slots, 2 * inter, dim, generator=gen) * 0.2,
                        torch.randn(slots, dim, inter, generator=gen) * 0.2)
    for counts in map(torch.tensor, ([0, 1, 53, 0, 5, 8], [0, 0, 53, 0, 0, 3], [1, 0, 0, 0, 0, 0])):
        xs = torch.randn(int(counts.sum()), dim, generator=gen)
        got = run_experts("native", xs, counts, stack)
        assert got.dtype == torch.float32 and got.shape == xs.shape
        for lib in builds():
            want = reference_experts(xs, counts, stack, round_act=False)
            got = native.experts(xs, counts, stack.w13, stack.w2, lib)
            assert ((got.double() - want).abs() <= 1e-5 * want.abs().max()).all(), (native.kind(lib), counts.tolist())
    with pytest.raises(ValueError, match="native.experts: xs torch.float32, w13 torch.bfloat16"):
        native.experts(xs, counts, stack.w13.bfloat16(), stack.w2.bfloat16())


def test_fp32_moe_is_the_torch_combine_bit_for_bit():
    """native.moe in fp32 (sort, experts, combine in one call) against experts.combine around
    native.experts: equal to the bit, for one token, a few, and all tokens on few experts, with the
    pairs counted into `load`; and the sum in slot order (two slots that cancel when added first)."""
    gen = torch.Generator().manual_seed(13)
    slots, dim, inter, top_k = 12, 72, 40, 4
    stack = ExpertStack(torch.randn(slots, 2 * inter, dim, generator=gen) * 0.1,
                        torch.randn(slots, dim, inter, generator=gen) * 0.1)
    for tokens, pool in ((1, slots), (5, slots), (33, top_k)):
        x = torch.randn(tokens, dim, generator=gen)
        ids = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k, generator=gen)
        order = ids.flatten().argsort(stable=True)
        rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
        for lib in builds():
            ys = native.experts(x.index_select(0, order // top_k), expert_counts(ids, slots), stack.w13, stack.w2, lib)
            load = torch.arange(slots)
            got = native.moe(x, ids, weights, stack.w13, stack.w2, load=load, lib=lib)
            assert got.dtype == torch.float32
            assert torch.equal(got, combine(ys, rows.view(ids.shape), ids, weights)), (tokens, native.kind(lib))
            assert torch.equal(load, torch.arange(slots) + expert_counts(ids, slots))
    loud = ExpertStack(stack.w13.clone(), stack.w2.clone())
    loud.w2[0] *= 2.0 ** 20
    loud.w13[1], loud.w2[1] = loud.w13[0], -loud.w2[0]
    x = torch.randn(2, dim, generator=gen)
    ids = torch.tensor([[0, 2, 1, 3], [2, 1, 3, 0]])
    weights = torch.tensor([[0.5, 0.3, 0.5, 0.2], [0.3, 0.5, 0.2, 0.5]])
    order = ids.flatten().argsort(stable=True)
    rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    ys = native.experts(x.index_select(0, order // top_k), expert_counts(ids, slots), loud.w13, loud.w2)
    assert torch.equal(native.moe(x, ids, weights, loud.w13, loud.w2), combine(ys, rows.view(ids.shape), ids, weights))
    with pytest.raises(ValueError, match="native.moe.*one dtype"):
        native.moe(x, ids, weights, stack.w13.bfloat16(), stack.w2.bfloat16())


def test_decode_attention_reads_the_rows_in_place_within_one_rounding():
    """Sequences of different lengths padded to one L (padding repeats a real row, as the read plan
    pads), scattered over a pool: each head's softmax-weighted latent, against float64."""
    gen = torch.Generator().manual_seed(4)
    seqs, heads, latent, rope, length = 5, 6, 40, 8, 23
    pool = torch.randn(200, latent + rope, generator=gen).bfloat16()
    lengths = torch.tensor([23, 1, 9, 17, 23])
    slots = torch.stack([torch.randperm(200, generator=gen)[:length] for _ in range(seqs)])
    for i, n in enumerate(lengths.tolist()):
        slots[i, n:] = slots[i, n - 1]
    q = torch.randn(seqs, heads, latent + rope, generator=gen).bfloat16()
    rows = pool[slots].double()  # [S, L, W]
    scores = torch.einsum("shw,slw->shl", q.double(), rows) * 0.3
    scores = scores.masked_fill(torch.arange(length)[None, None] >= lengths[:, None, None], float("-inf"))
    probs = scores.softmax(-1)
    want = torch.einsum("shl,slc->shc", probs, rows[..., :latent])
    # with bf16 pair products the probabilities are rounded to bf16 (as torch's fused attention
    # rounds them): each term off by at most 2^-8 of its size (bf16's unit roundoff), so the sum by 2^-8 of sum p |k|
    spread = torch.einsum("shl,slc->shc", probs, rows[..., :latent].abs())
    for lib in builds():
        got = native.decode_attention(q, pool, slots, lengths, latent, 0.3, lib)
        assert got.shape == (seqs, heads, latent) and got.dtype == torch.bfloat16
        if native.kind(lib) == "avx512-bf16":
            off = within_one_rounding(got, want, length * (latent + rope), 2.0 ** -8 * spread)
        else:
            off = within_one_rounding(got, want, length * (latent + rope))
        assert off, native.kind(lib)
    # an odd row width: the last channel pairs with nothing (AVX512-BF16 meets the channels in pairs)
    odd_pool, odd_q = pool[:, :-1].contiguous(), q[..., :-1].contiguous()
    odd_rows = odd_pool[slots].double()
    scores = torch.einsum("shw,slw->shl", odd_q.double(), odd_rows) * 0.3
    probs = scores.masked_fill(torch.arange(length)[None, None] >= lengths[:, None, None], float("-inf")).softmax(-1)
    want = torch.einsum("shl,slc->shc", probs, odd_rows[..., :latent])
    spread = torch.einsum("shl,slc->shc", probs, odd_rows[..., :latent].abs())
    for lib in builds():
        got = native.decode_attention(odd_q, odd_pool, slots, lengths, latent, 0.3, lib)
        assert within_one_rounding(got, want, length * (latent + rope), 2.0 ** -8 * spread), native.kind(lib)
    # fewer sequences than threads: the heads are split in groups of 8 (20 heads: 8+8+4 at 1 sequence
    # on 4 threads, 16+4 at 3)
    wide_q = torch.randn(seqs, 20, latent + rope, generator=gen).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for n in (1, 3):
            scores = torch.einsum("shw,slw->shl", wide_q[:n].double(), rows[:n]) * 0.3
            scores = scores.masked_fill(torch.arange(length)[None, None] >= lengths[:n, None, None], float("-inf"))
            probs = scores.softmax(-1)
            want = torch.einsum("shl,slc->shc", probs, rows[:n, :, :latent])
            spread = torch.einsum("shl,slc->shc", probs, rows[:n, :, :latent].abs())
            for lib in builds():
                got = native.decode_attention(wide_q[:n], pool, slots[:n], lengths[:n], latent, 0.3, lib)
                bound = 2.0 ** -8 * spread
                assert within_one_rounding(got, want, length * (latent + rope), bound), (n, native.kind(lib))
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="native.decode_attention"):
        native.decode_attention(q.float(), pool, slots, lengths, latent, 0.3)
    with pytest.raises(RuntimeError, match="lengths"):
        native.decode_attention(q, pool, slots, torch.tensor([23, 0, 9, 17, 23]), latent, 0.3)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    from shared.model.presets import init_model

    return init_model(tmp_path_factory.mktemp("tiny-bf16-native"), "tiny", seed=0, dtype="bf16")


def test_a_native_plan_is_as_close_to_fp32_as_torchs_kernels(tiny_bf16, monkeypatch):
    """Prefill (every row count) then decode steps of 3 sequences (3 rows: the linears go native too)
    on `1:native`, against the same bf16 checkpoint computed in fp32; torch's `sparse` in bf16 for
    the yardstick. The native path must be used, and no further from fp32 than torch's."""
    truth_model = load_model(tiny_bf16, dtype="fp32")
    model = load_model(tiny_bf16, dtype="bf16")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=gen).tolist() for n in (1, 6, 11)]
    continuations = [torch.randint(3, model.args.vocab_size, (6,), generator=gen).tolist() for _ in prompts]
    truth = torch.cat(incremental_logits(truth_model, prompts, continuations))

    calls = {"_linear": 0, "moe_block": 0, "decode_layers": 0, "_rms_norm": 0, "_mlp": 0,
             "_add_rms_norm": 0}  # what the modules call (the decode steps' layers: decode_layers)

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted
    for name in calls:
        monkeypatch.setattr(native, name, counting(name, getattr(native, name)))
    errors = {}
    for plan in ("sparse", "native"):
        model.set_moe_backend(plan)
        got = torch.cat(incremental_logits(model, prompts, continuations))
        errors[plan] = (got - truth).abs().max().item()
    assert all(calls.values()), calls
    assert model.lm_head.native_rows == frozenset(range(1, native.LINEAR_ROWS + 1))
    assert model.model.norm.native_rows == frozenset(range(1, native.NORM_ROWS + 1))
    assert errors["native"] <= 1.5 * errors["sparse"] + 1e-3, errors

    model.set_moe_backend("1:native,4:sparse")  # the linears follow the plan's token counts
    assert model.lm_head.native_rows == frozenset({1, 2, 3})
    model.set_moe_backend("sparse")
    assert model.lm_head.native_rows == frozenset()


def test_the_packed_experts_are_made_with_the_plan_and_with_an_ep_ranks_staged_placement(tiny_bf16):
    """The native loops' copy of each stack is made when a native plan is set, and by an EP rank when it
    stages a placement (off the compute thread), not in a step; it follows a changed weight."""
    if native.kind() != "avx512-bf16":
        pytest.skip(f"the experts are packed for AVX512-BF16 only; this CPU's kernels are {native.kind()}")
    from shared.ep.moe import EPMoE
    model = load_model(tiny_bf16, dtype="bf16")
    model.set_moe_backend("native")
    moe = next(m for m in model.modules() if isinstance(getattr(m, "stack", None), ExpertStack))
    assert getattr(moe.stack, "_packed_key", None) is not None
    w13p = moe.stack.packed_for_native()[0]
    moe.stack.w13[0, 0, 0] += 1  # a changed weight: packed again
    assert not torch.equal(moe.stack.packed_for_native()[0], w13p)
    slots = list(range(moe.num_experts))
    rank = EPMoE(moe, 1, 0, 1, slots, exchange=None, wire="exact")
    assert getattr(rank.stack, "_packed_key", None) is not None
    staged = rank.stage(slots[::-1], lambda layer, expert: moe.experts[expert])
    assert getattr(staged, "_packed_key", None) is not None
    assert torch.equal(staged.packed_for_native()[1][0], rank.stack.packed_for_native()[1][-1])


def test_the_fused_calls_are_the_module_path_to_the_bit(tiny_bf16, monkeypatch):
    """A decode step's layers through native.decode_layers (one call), each layer's attention through
    native.mla_decode and each MoE layer with its residual through native.moe_block, and the modules'
    own calls (projections, norms, rotations, the cache store, W_UK, the attention in place, W_UV,
    o_proj; the gate, the experts, the shared expert, the sum): the same logits to the bit (each step
    reading the rows the earlier ones stored) and the same expert load counts; each path used where
    the ones above it are off."""
    from shared.model.attention import MLA
    from shared.model.model import DeepseekV3
    from shared.model.moe import MoE
    model = load_model(tiny_bf16, dtype="bf16")
    model.set_moe_backend("native")
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=gen).tolist() for n in (2, 9, 5)]
    continuations = [torch.randint(3, model.args.vocab_size, (k,), generator=gen).tolist() for k in (4, 2, 4)]
    calls = {"decode_layers": 0, "mla_decode": 0, "decode_attention": 0, "heads": 0, "store_rows": 0,
             "moe_block": 0, "moe": 0}

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted
    for name in calls:
        monkeypatch.setattr(native, name, counting(name, getattr(native, name)))
    moes = [m for m in model.modules() if isinstance(m, MoE)]

    def run():
        """The logits, the experts' load the run counted, and the calls it made."""
        calls.update(dict.fromkeys(calls, 0))
        before = [torch.zeros(m.num_experts, dtype=torch.int64) if m.expert_load is None else m.expert_load.clone()
                  for m in moes]
        logits = torch.cat(incremental_logits(model, prompts, continuations))
        return logits, [m.expert_load - b for m, b in zip(moes, before)], dict(calls)

    whole, counted, made = run()
    assert made["decode_layers"] == 4 and made["mla_decode"] == 0 and made["decode_attention"] == 0, made
    monkeypatch.setattr(DeepseekV3, "_decode_layers", lambda self, *args: None)  # layer by layer
    logits, load, made = run()
    assert torch.equal(logits, whole) and all(torch.equal(a, b) for a, b in zip(load, counted))
    assert made["decode_layers"] == 0 and made["mla_decode"] == 4 * model.args.num_hidden_layers, made
    assert made["moe_block"] and made["moe"] == 0, made
    monkeypatch.setattr(MLA, "_decode_native", lambda self, *args: None)  # the module paths
    monkeypatch.setattr(MoE, "forward_residual", lambda self, x, h: h + self(x))
    logits, load, made = run()
    assert torch.equal(logits, whole) and all(torch.equal(a, b) for a, b in zip(load, counted))
    assert made["mla_decode"] == made["moe_block"] == 0, made
    assert made["decode_attention"] and made["heads"] and made["store_rows"] and made["moe"], made


def test_the_whole_step_call_reads_the_weights_the_modules_hold_now(tiny_bf16, monkeypatch):
    """native.decode_layers reads the layers from a description made once: a weight changed in place, a
    parameter or load counter replaced, or a bias added (which the fused calls do not take: the modules
    then run) are seen at the next step, where the logits and load counts stay those of the module path."""
    from shared.model.model import DeepseekV3
    from shared.model.moe import MoE
    model = load_model(tiny_bf16, dtype="bf16")
    model.set_moe_backend("native")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=gen).tolist() for n in (3, 4)]
    continuations = [torch.randint(3, model.args.vocab_size, (3,), generator=gen).tolist() for _ in prompts]
    made = []
    monkeypatch.setattr(native, "decode_layers", lambda *args, fn=native.decode_layers: made.append(1) or fn(*args))
    fused = DeepseekV3._decode_layers
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    attn = model.model.layers[1].self_attn

    def both() -> bool:
        """Whether the whole-step call ran, after checking it against the module path."""
        made.clear()
        before = (torch.zeros(moe.num_experts, dtype=torch.int64) if moe.expert_load is None
                  else moe.expert_load.clone())
        got = torch.cat(incremental_logits(model, prompts, continuations))
        load = moe.expert_load - before
        ran = bool(made)
        monkeypatch.setattr(DeepseekV3, "_decode_layers", lambda self, *args: None)
        before = moe.expert_load.clone()
        assert torch.equal(torch.cat(incremental_logits(model, prompts, continuations)), got)
        assert torch.equal(moe.expert_load - before, load)
        monkeypatch.setattr(DeepseekV3, "_decode_layers", fused)
        return ran

    assert both()
    with torch.no_grad():
        attn.o_proj.weight.mul_(1.5)  # in place: a new version
        moe.stack.w2[:, :4].mul_(-1)  # the routed experts' own stack
    assert both()
    attn.q_b_proj.weight = torch.nn.Parameter(attn.q_b_proj.weight.detach() * 0.5, requires_grad=False)
    moe.expert_load = moe.expert_load.clone()  # another counter (as distillation makes)
    assert both()
    attn.o_proj.bias = torch.nn.Parameter(torch.full((model.args.hidden_size,), 0.01, dtype=torch.bfloat16),
                                          requires_grad=False)
    assert not both()  # not described: the layers run one by one, with the bias


def test_native_is_refused_where_it_cannot_run_naming_device_dtype_and_reason(tiny_bf16, monkeypatch):
    with pytest.raises(ValueError, match="native.*device=cpu, dtype=float16"):
        check_supported(MoEPlan.single("native"), "cpu", torch.float16)
    with pytest.raises(ValueError, match="native.*device=meta, dtype=bfloat16"):
        check_supported(MoEPlan.parse("1:native,16:weight-major"), "meta", torch.bfloat16)
    check_supported(MoEPlan.single("native"), "cpu", torch.float32)  # its fp32 experts
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.build.cache_clear()
    try:
        assert "/nonexistent/cc" in native.unavailable()
        with pytest.raises(ValueError, match="unavailable here.*no C compiler"):
            check_supported(MoEPlan.single("native"), "cpu", torch.bfloat16)
    finally:
        native.build.cache_clear()


def test_bench_attention_times_both_paths_and_they_agree(tmp_path):
    from loadgen import bench_attention

    out = tmp_path / "attention.json"
    result = bench_attention.main(["--preset", "tiny", "--seqs", "1,3", "--context", "20", "--repeats", "1",
                                   "--out", str(out)])
    assert [row["seqs"] for row in result["rows"]] == [1, 3] and out.exists()
    for row in result["rows"]:
        assert row["ms"]["torch"] > 0 and row["ms"]["native"] > 0 and row["context"] == 21
        assert row["max_diff_of_max"] < 0.05, row  # the same attention, up to bf16 rounding


def test_bench_model_bounds_each_row_with_rates_measured_among_its_steps(tiny_bf16, tmp_path):
    """bench_model's roofline rows: each with its read rates probed before its steps and after each
    pair (the median kept), its matmul rate before and after (the better kept), and its bound and
    ratios from those."""
    from loadgen import bench_model

    out = tmp_path / "model.json"
    report = bench_model.main(["--model", str(tiny_bf16), "--no-reference", "--roofline-batches", "1,3",
                               "--roofline-steps", "2", "--input-len", "8", "--dtype", "bf16", "--moe-backend",
                               "native", "--roofline-baseline", "loop", "--threads", "2", "--out", str(out)])
    assert [row["batch"] for row in report["roofline"]] == [1, 3] and out.exists()
    for row in report["roofline"]:
        assert len(row["read_probes"]) == 3 and len(row["matmul_probes"]) == 2  # before, then after each of 2 pairs
        for key in ("read_gbps", "chunk_read_gbps"):
            assert row[key] == sorted(p[key] for p in row["read_probes"])[1] > 0
        assert row["matmul_flop_s"] == max(row["matmul_probes"]) > 0
        bound = max(row["bytes"] / (row["read_gbps"] * 1e9), row["flops"] / row["matmul_flop_s"])
        assert abs(row["bound_ms"] - 1e3 * bound) < 1e-9 * row["bound_ms"] + 1e-12
        assert abs(row["over_bound"] - row["step_ms"] / row["bound_ms"]) < 1e-9 * row["over_bound"]
        bw, rate = row["read_gbps"] * 1e9, row["matmul_flop_s"]
        parts = (max(row["expert_bytes"] / bw, row["expert_flops"] / rate)
                 + max((row["bytes"] - row["expert_bytes"]) / bw, (row["flops"] - row["expert_flops"]) / rate))
        assert 0 < row["expert_bytes"] < row["bytes"] and 0 < row["expert_flops"] < row["flops"]
        assert abs(row["parts_bound_ms"] - 1e3 * parts) < 1e-9 * row["parts_bound_ms"]
        # (equal when both are bound by their bytes: the two sums then round apart by an ulp)
        assert row["bound_ms"] <= row["parts_bound_ms"] * (1 + 1e-12) and row["parts_bound_ms"] <= 2 * row["bound_ms"]
        assert abs(row["over_parts_bound"] - row["step_ms"] / row["parts_bound_ms"]) < 1e-9 * row["over_parts_bound"]
        assert row["step_ms"] > 0 and row["baseline_step_ms"] > 0 and row["bytes"] > 0


def test_bench_engine_runs_ours_loop_and_transformers_on_the_same_requests(tiny_fp32, tmp_path):
    """bench_engine end to end on `tiny` in fp32: the chosen backend and `loop` give the same greedy
    tokens, transformers' `generate` the same tokens as ours, and every full-batch decode step is
    set against its roofline."""
    from loadgen import bench_engine

    out = tmp_path / "engine.json"
    r = bench_engine.main(["--model", str(tiny_fp32), "--num-requests", "4", "--input-len", "12", "--output-len", "6",
                           "--reference-requests", "4", "--reference-batch", "4", "--dtype", "fp32",
                           "--moe-backend", "grouped", "--threads", "2", "--out", str(out)])
    lengths = [len(t) for t in r["ours_all"]["tokens"]]
    assert r["ours_all"]["output_tokens"] == sum(lengths) == r["requested_output_tokens"]
    assert r["greedy_equal_chosen_vs_loop"] == 4 and r["ratio_chosen_vs_loop"] > 0
    assert r["greedy_agreement_first_tokens"] == lengths  # token-identical to transformers in fp32
    assert r["ours_all"]["median_over_bound_at_full_batch"] > 0
    assert json.loads(out.read_text())["moe_backend"] == "grouped"


def test_device_check_dry_runs_its_steps_on_the_cpu_within_its_budget(tmp_path):
    """The prepared device script (loadgen/device_check.py), as a dry run on the CPU at toy sizes:
    each step a subprocess with its exit status, the benchmarks' JSON and the headline figures
    collected; a step the budget leaves no time for is recorded as skipped, not run."""
    from loadgen import device_check

    s = device_check.main(["--device", "cpu", "--quick", "--only", "environment,tests,engine,model",
                           "--out", str(tmp_path / "run")])
    assert list(s["steps"]) == ["environment", "tests", "engine", "model"]
    assert all(step["rc"] == 0 for step in s["steps"].values()), s["steps"]
    h = s["headlines"]
    assert h["environment"]["device_available"] == torch.cuda.is_available()
    assert ("passed" if torch.cuda.is_available() else "3 skipped") in h["tests"]
    assert h["engine"]["greedy_equal_chosen_vs_loop"] == 4 and h["engine"]["output_tok_s"] > 0
    assert [r["running"] for r in h["model"]] == [1, 3] and all(r["over_parts_bound"] > 0 for r in h["model"])
    for name in ("device-check.json", "device-check.log", "bench-engine.json", "bench-model.json"):
        assert (tmp_path / "run" / name).exists(), name
    s = device_check.main(["--device", "cpu", "--quick", "--only", "engine", "--budget-s", "2",
                           "--out", str(tmp_path / "short")])
    assert s["steps"] == {"engine": {"command": s["steps"]["engine"]["command"], "rc": None,
                                     "skipped": "no time left"}}
    with pytest.raises(SystemExit, match="no step gpu"):
        device_check.main(["--only", "tests,gpu", "--out", str(tmp_path / "bad")])
