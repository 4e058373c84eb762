"""The stacked experts and their backends: every backend against the per-pair reference on random
routings (empty experts, one token, every token on one expert), the fixed-order combine, plans,
and the loader's stack (views of one tensor, no second copy)."""
from __future__ import annotations

import pytest
import torch

from shared.model.config import ModelArgs
from shared.model.experts import BACKENDS, ExpertStack, MoEPlan, check_supported, combine, expert_counts, run_experts
from shared.model.loader import load_model
from shared.model.moe import MoE

FAST = [b for b in BACKENDS if b != "reference"]  # native in fp32 here; its bf16 loops: tests/test_native.py


def random_moe(seed: int, num_experts: int = 8, top_k: int = 3, dim: int = 32, inter: int = 16) -> MoE:
    args = ModelArgs(vocab_size=64, hidden_size=dim, intermediate_size=48, moe_intermediate_size=inter,
                     num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=num_experts,
                     num_experts_per_tok=top_k, n_group=2, topk_group=2, n_shared_experts=1,
                     num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                     qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64)
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(args)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    moe.stack_experts()
    return moe


def reference_routed(moe: MoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each (token, expert) pair alone, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = moe.experts[int(ids[t, k])]
            g = x[t].double() @ e.gate_proj.weight.double().T
            u = x[t].double() @ e.up_proj.weight.double().T
            out[t] += weights[t, k].double() * ((torch.nn.functional.silu(g) * u) @ e.down_proj.weight.double().T)
    return out


def routings(num_experts: int, top_k: int):
    gen = torch.Generator().manual_seed(3)

    def random(t):
        return torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(t)])
    yield "one token", random(1)
    yield "many tokens", random(37)
    skewed = random(20)
    skewed[:, 0] = 5  # every token on expert 5 (first choice), others random but distinct
    for row in skewed:
        rest = [e for e in torch.randperm(num_experts, generator=gen).tolist() if e != 5][:top_k - 1]
        row[1:] = torch.tensor(rest)
    yield "all on one expert", skewed
    few = random(6)
    few[:] = torch.tensor([0, 1, 2])  # experts 3..7 get nothing
    yield "empty experts", few


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", ["one token", "many tokens", "all on one expert", "empty experts"])
def test_every_backend_matches_the_per_pair_reference(backend, case):
    moe = random_moe(1)
    ids = dict(routings(8, 3))[case]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(ids.shape[0], 32, generator=gen)
    weights = torch.rand(ids.shape, generator=gen)
    counts = expert_counts(ids, 8)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=8).tolist()
    got = moe.routed_grouped(x, weights, ids, counts, backend)
    want = reference_routed(moe, x, weights, ids)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (got.double() - want).abs().max()


def test_run_experts_keeps_empty_input_and_refuses_an_unknown_backend():
    stack = random_moe(2).stack
    assert run_experts("grouped", torch.empty(0, 32), torch.zeros(8, dtype=torch.long), stack).shape == (0, 32)
    with pytest.raises(ValueError, match="'sideways'"):
        run_experts("sideways", torch.ones(2, 32), torch.tensor([2, 0, 0, 0, 0, 0, 0, 0]), stack)


def test_combine_sums_each_tokens_pairs_in_expert_order_whatever_the_row_order():
    """The same pair outputs stored in rows in another order give bit-identical sums, and the sum
    is the one taken in expert-id order (not the order the token listed its experts)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([[4, 1, 7], [0, 6, 2]])
    weights = torch.rand(2, 3, generator=gen)
    ys = torch.randn(6, 16, generator=gen) * 1e3  # large values: a different order rounds differently
    rows = torch.arange(6).view(2, 3)
    perm = torch.randperm(6, generator=gen)
    shuffled = torch.empty_like(ys)
    shuffled[perm] = ys
    a = combine(ys, rows, ids, weights)
    b = combine(shuffled, perm[rows], ids, weights)
    assert torch.equal(a, b)
    for t in range(2):
        order = ids[t].argsort()
        want = ys[rows[t, order[0]]] * weights[t, order[0]]
        for k in order[1:]:
            want = want + ys[rows[t, k]] * weights[t, k]
        assert torch.equal(a[t], want)


def test_plans_parse_choose_and_refuse():
    plan = MoEPlan.parse("1:loop,16:weight-major")
    assert [plan.choose(n) for n in (1, 15, 16, 500)] == ["loop", "loop", "weight-major", "weight-major"]
    assert plan.text == "1:loop,16:weight-major" and MoEPlan.parse(plan.text) == plan
    assert MoEPlan.parse("grouped").text == "grouped"
    for bad in ("sideways", "2:loop", "1:loop,1:bmm", "1:loop,x:bmm", "auto"):
        with pytest.raises(ValueError, match="--moe-backend"):
            MoEPlan.parse(bad)


def test_grouped_is_refused_where_it_cannot_run_naming_device_and_dtype():
    check_supported(MoEPlan.single("grouped"), "cpu", torch.float32)
    check_supported(MoEPlan.single("bmm"), "meta", torch.float32)
    with pytest.raises(ValueError, match="device=meta, dtype=float32"):
        check_supported(MoEPlan.single("grouped"), "meta", torch.float32)


def test_the_loader_fills_one_stack_per_layer_and_experts_are_its_views(tiny_fp32):
    model = load_model(tiny_fp32, dtype="fp32")
    for block in model.model.layers[1:]:
        stack = block.mlp.stack
        assert isinstance(stack, ExpertStack) and stack.w13.is_contiguous() and stack.w2.is_contiguous()
        assert stack.w13.shape == (16, 2 * 64, 128) and stack.w2.shape == (16, 128, 64)
        e = block.mlp.experts[3]
        assert e.gate_proj.weight.data_ptr() == stack.w13[3].data_ptr()
        assert e.up_proj.weight.data_ptr() == stack.w13[3, 64:].data_ptr()
        assert e.down_proj.weight.data_ptr() == stack.w2[3].data_ptr()
    # the file's values landed in the stack (a random-init expert would not match the other load)
    again = load_model(tiny_fp32, dtype="fp32", keep=lambda name: ".experts.3." in name or ".experts." not in name)
    assert torch.equal(again.model.layers[1].mlp.experts[3].up_proj.weight, model.model.layers[1].mlp.stack.w13[3, 64:])
    # parameters are counted once: the views, not the stack as well
    expert_params = sum(p.numel() for p in model.model.layers[1].mlp.experts.parameters())
    assert expert_params == model.model.layers[1].mlp.stack.w13.numel() + model.model.layers[1].mlp.stack.w2.numel()
