"""The batched engine on the tiny preset (fp32) against transformers, one prompt at a time."""
from __future__ import annotations

import pytest
import torch
from reference import load_reference, reference_greedy

from shared.engine.engine import Engine, EngineConfig, RequestError
from shared.engine.sequence import SamplingParams
from shared.model.kv_cache import LatentKVPool
from shared.model.loader import load_model

LENGTHS = [1, 2, 5, 17, 33, 63, 64, 65, 100, 127, 128, 129, 200, 255, 256, 300]
MAX_TOKENS = [24, 9, 40, 16, 33, 8, 20, 12, 30, 5, 18, 26, 14, 21, 10, 28]


@pytest.fixture(scope="module")
def model(tiny_fp32):
    return load_model(tiny_fp32, dtype="fp32")


@pytest.fixture(scope="module")
def prompts(model):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, model.args.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def expected(tiny_fp32, prompts):
    ref = load_reference(tiny_fp32)
    return [reference_greedy(ref, p, m) for p, m in zip(prompts, MAX_TOKENS)]


def block_bytes(model) -> int:
    return 64 * LatentKVPool.bytes_per_token(model.args, model.dtype)


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]], arrive_at: dict[str, int] | None = None,
        max_steps: int = 10_000) -> dict[str, list[int]]:
    """Drive the engine to completion; check each stream's indices are contiguous and end once."""
    arrive_at = arrive_at or {rid: 0 for rid in requests}
    outputs: dict[str, list[int]] = {rid: [] for rid in requests}
    finished: set[str] = set()
    for step in range(max_steps):
        for rid, at in arrive_at.items():
            if at == step:
                engine.add_request(rid, *requests[rid])
        if not engine.has_unfinished() and step > max(arrive_at.values()):
            break
        for delta in engine.step():
            assert delta.request_id not in finished
            assert delta.index == len(outputs[delta.request_id]), "gap or duplicate in the token stream"
            outputs[delta.request_id].extend(delta.token_ids)
            if delta.finish_reason:
                finished.add(delta.request_id)
    assert finished == set(requests)
    return outputs


def greedy_requests(prompts):
    return {f"r{i}": (p, SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS))}


def check_against_reference(outputs, expected):
    covered = 0
    for i, exp in enumerate(expected):
        got = outputs[f"r{i}"]
        assert len(got) == MAX_TOKENS[i]
        assert got[:exp.trusted] == exp.tokens[:exp.trusted], f"prompt {i} ({LENGTHS[i]} tokens)"
        covered += exp.trusted
    assert covered >= 0.8 * sum(MAX_TOKENS), f"near-ties cut the comparison to {covered} tokens"


def test_all_at_once_matches_reference(model, prompts, expected):
    engine = Engine(model, EngineConfig(kv_cache_bytes=200 * block_bytes(model), max_num_batched_tokens=512))
    check_against_reference(run(engine, greedy_requests(prompts)), expected)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_staggered_arrivals_with_chunked_prefill(model, prompts, expected):
    engine = Engine(model, EngineConfig(kv_cache_bytes=200 * block_bytes(model), max_num_batched_tokens=96))
    arrivals = {f"r{i}": 3 * i for i in range(len(prompts))}
    check_against_reference(run(engine, greedy_requests(prompts), arrivals), expected)


def test_preemption_keeps_outputs(model, prompts, expected):
    engine = Engine(model, EngineConfig(kv_cache_bytes=12 * block_bytes(model), max_num_batched_tokens=256))
    outputs = run(engine, greedy_requests(prompts))
    check_against_reference(outputs, expected)
    assert engine.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_seeded_sampling_is_batch_independent(model, prompts):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run(Engine(model), {"x": (prompts[8], params)})["x"]
    crowd = {f"o{i}": (p, SamplingParams(max_tokens=15, temperature=1.0, seed=i, ignore_eos=True))
             for i, p in enumerate(prompts[:6])}
    crowd["x"] = (prompts[8], params)
    together = run(Engine(model), crowd, {rid: (2 if rid == "x" else 0) for rid in crowd})["x"]
    squeezed = run(Engine(model, EngineConfig(kv_cache_bytes=8 * block_bytes(model))), crowd)["x"]
    assert alone == together == squeezed
    other_seed = run(Engine(model), {"x": (prompts[8], SamplingParams(max_tokens=20, temperature=0.9, top_k=50,
                                                                       top_p=0.9, seed=99, ignore_eos=True))})["x"]
    assert other_seed != alone


def test_a_resumed_seeded_request_draws_the_tokens_it_would_have(model, prompts):
    """Resumed after 8 tokens (its decode rank died): prompt + those 8, starting at index 8."""
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=77, ignore_eos=True)
    whole = run(Engine(model), {"x": (prompts[3], params)})["x"]
    rest = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=77, ignore_eos=True,
                          first_index=8)
    assert run(Engine(model), {"x": (prompts[3] + whole[:8], rest)})["x"] == whole[8:]


def test_abort_frees_every_block(model, prompts):
    engine = Engine(model, EngineConfig(kv_cache_bytes=40 * block_bytes(model)))
    start = engine.blocks.num_free
    for i, p in enumerate(prompts[:10]):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.blocks.num_free < start
    for i in range(0, 10, 2):
        assert engine.abort(f"r{i}")
    assert not engine.abort("r0") and not engine.abort("never-added")
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == start
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)


def test_stop_tokens_and_eos(model, prompts):
    free = run(Engine(model), {"a": (prompts[4], SamplingParams(max_tokens=12, ignore_eos=True))})["a"]
    stop = free[6]
    first = free.index(stop)
    stopped = run(Engine(model), {"a": (prompts[4], SamplingParams(max_tokens=12, stop_token_ids=(stop,)))})["a"]
    assert stopped == free[:first]


def test_prefix_blocks_are_shared_within_the_engine(model, prompts):
    engine = Engine(model)
    long_prompt = prompts[-1]  # 300 tokens: 4 full blocks before the last token
    first = run(engine, {"a": (long_prompt, SamplingParams(max_tokens=8, ignore_eos=True))})
    engine.add_request("b", long_prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    deltas = engine.step()
    assert deltas[0].num_cached_tokens == 256
    rest = deltas[0].token_ids
    while engine.has_unfinished():
        rest += [t for d in engine.step() for t in d.token_ids]
    assert rest == first["a"]


def test_prefill_then_decode_handoff(model, prompts):
    """A prefill-mode engine samples the first token and hands over the prompt's KV; a decode-mode
    engine continues from it. Together they give the mixed engine's tokens."""
    requests = {f"r{i}": (prompts[i], SamplingParams(max_tokens=10, ignore_eos=True)) for i in (3, 9, 15)}
    mixed = run(Engine(model), requests)
    prefill = Engine(model, EngineConfig(mode="prefill"))
    decode = Engine(model, EngineConfig(mode="decode"))
    for rid, (p, params) in requests.items():
        prefill.add_request(rid, p, params)
    handoffs = []
    while prefill.has_unfinished():
        handoffs += prefill.step()
    assert prefill.blocks.num_free == prefill.blocks.num_blocks
    outputs = {}
    for d in handoffs:
        assert d.kv.shape == (model.args.num_hidden_layers, len(requests[d.request_id][0]), model.args.kv_cache_dim)
        assert decode.add_prefilled(d.request_id, requests[d.request_id][0], requests[d.request_id][1],
                                    d.token_ids[0], d.kv)
        outputs[d.request_id] = list(d.token_ids)
    while decode.has_unfinished():
        for d in decode.step():
            assert d.index == len(outputs[d.request_id])
            outputs[d.request_id] += d.token_ids
    assert outputs == mixed


def test_an_external_prefix_is_not_computed_again(model, prompts):
    """The KV of a prompt's first blocks from outside (the on-disk prefix cache) goes into the pool
    at admission: the tokens are the ones computed from scratch, the prefix counts as cached, and
    fewer tokens are computed."""
    requests = {f"r{i}": (prompts[i], SamplingParams(max_tokens=10, ignore_eos=True)) for i in (9, 15)}
    scratch = run(Engine(model), requests)
    prefill = Engine(model, EngineConfig(mode="prefill"))
    for rid, (p, params) in requests.items():
        prefill.add_request(rid, p, params)
    kv = {}
    while prefill.has_unfinished():
        kv.update({d.request_id: d.kv for d in prefill.step()})
    engine = Engine(model, EngineConfig(share_prefixes=False))
    computed = 0
    outputs = {rid: [] for rid in requests}
    cached = {}
    for rid, (p, params) in requests.items():
        n = (len(p) - 1) // 64 * 64
        engine.add_request(rid, p, params, prefix_kv=kv[rid][:, :n])
        cached[rid] = n
    while engine.has_unfinished():
        deltas = engine.step()
        computed += engine.last_num_tokens
        for d in deltas:
            outputs[d.request_id] += d.token_ids
            assert d.num_cached_tokens == cached[d.request_id]
    assert outputs == scratch
    assert computed == sum(len(p) - cached[rid] + 9 for rid, (p, _) in requests.items())
    with pytest.raises(RequestError, match="prefix_kv"):
        engine.add_request("bad", prompts[9], SamplingParams(), prefix_kv=kv["r9"][:, :10])
    with pytest.raises(RequestError, match="prefix_kv"):
        engine.add_request("bad", prompts[9][:64], SamplingParams(), prefix_kv=kv["r9"][:, :64])


def test_finished_requests_leave_the_kv_of_every_token(model, prompts):
    """Decode with the prefix cache on: a finished request's KV covers every token, its last one
    included (computed in one more step, after the client got the answer), equal to a fresh
    prefill of the whole sequence."""
    prompt = prompts[12]  # 200 tokens; 56 more make 256: whole blocks, the last one ending on the reply
    prefill = Engine(model, EngineConfig(mode="prefill"))
    prefill.add_request("r", prompt, SamplingParams(max_tokens=56, ignore_eos=True))
    (handoff,) = prefill.step()
    decode = Engine(model, EngineConfig(mode="decode"))
    decode.keep_finished_kv = True
    assert decode.add_prefilled("r", prompt, SamplingParams(max_tokens=56, ignore_eos=True), handoff.token_ids[0],
                                handoff.kv)
    tokens = list(handoff.token_ids)
    while decode.has_unfinished():
        tokens += [t for d in decode.step() for t in d.token_ids]
    assert len(tokens) == 56 and decode.blocks.num_free == decode.blocks.num_blocks
    ((rid, token_ids, kv),) = decode.finished_kv
    assert rid == "r" and token_ids == prompt + tokens and kv.shape[1] == 256
    fresh = Engine(model, EngineConfig(mode="prefill"))
    fresh.add_request("f", token_ids + [5], SamplingParams(max_tokens=2, ignore_eos=True))
    (whole,) = fresh.step()
    assert torch.allclose(kv, whole.kv[:, :256], atol=1e-4)


def test_a_request_not_ending_on_a_block_boundary_leaves_its_blocks_at_once(model, prompts):
    """Its full blocks are all computed when its last token is sampled: they come with the final
    delta, no extra step; a request with no full block is reported too (KV None)."""
    decode = Engine(model, EngineConfig(mode="decode"))
    decode.keep_finished_kv = True
    prefill = Engine(model, EngineConfig(mode="prefill"))
    for rid, prompt, n in (("long", prompts[12], 30), ("short", prompts[0][:10], 3)):
        prefill.add_request(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True))
        (handoff,) = prefill.step()
        assert decode.add_prefilled(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True), handoff.token_ids[0],
                                    handoff.kv)
    finished_at = {}
    while decode.has_unfinished():
        for d in decode.step():
            if d.finish_reason:
                finished_at[d.request_id] = {rid for rid, _, _ in decode.finished_kv}
    assert "long" in finished_at["long"] and "short" in finished_at["short"]  # in the same step
    entries = {rid: (ids, kv) for rid, ids, kv in decode.finished_kv}
    assert len(entries["long"][0]) == 192 and entries["long"][1].shape[1] == 192  # 200 + 30 = 230: 3 blocks
    assert entries["short"] == ([], None)


@pytest.mark.parametrize("prompt, params, field", [
    ([], SamplingParams(), "prompt"),
    ([5] * 2048, SamplingParams(), "prompt"),
    ([5, 6], SamplingParams(max_tokens=0), "max_tokens"),
    ([5, 6], SamplingParams(max_tokens=2047), "max_tokens"),
    ([5, 6], SamplingParams(top_p=0.0), "top_p"),
    ([5, 6], SamplingParams(top_p=1.5), "top_p"),
    ([5, 6], SamplingParams(temperature=-1.0), "temperature"),
    ([5, 6], SamplingParams(top_k=-2), "top_k"),
    ([5, 5000], SamplingParams(), "prompt[1]"),
])
def test_bad_requests_name_the_field(model, prompt, params, field):
    engine = Engine(model)
    with pytest.raises(RequestError) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.field == field and str(info.value).startswith(field)
    assert not engine.has_unfinished()


def test_request_that_can_never_fit_is_refused(model):
    engine = Engine(model, EngineConfig(kv_cache_bytes=2 * block_bytes(model)))
    with pytest.raises(RequestError, match="can never fit"):
        engine.add_request("big", list(range(3, 103)), SamplingParams(max_tokens=100))
