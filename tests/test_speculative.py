"""Speculative decoding with the MTP layer, in the engine (tiny, fp32): the tokens are exactly those
without speculation (and transformers'), for greedy and seeded sampled requests, through prefix
hits, chunked prefill and preemption; rejected drafts leave no block and no KV behind."""
from __future__ import annotations

import random

import pytest
import torch
from reference import load_reference, reference_greedy
from test_engine import block_bytes, run

from shared.engine.engine import Engine, EngineConfig, RequestError
from shared.engine.sampler import Sampler
from shared.engine.sequence import SamplingParams
from shared.launcher.cliargs import FlagValueError, resolve_speculative_tokens, speculative_tokens_flag
from shared.model.loader import load_model

LENGTHS = [1, 3, 17, 63, 64, 65, 100, 129, 200]
MAX_TOKENS = [30, 12, 40, 25, 33, 20, 16, 28, 22]


@pytest.fixture(scope="module")
def model(tiny_mtp):
    return load_model(tiny_mtp, dtype="fp32")


@pytest.fixture(scope="module")
def prompts(model):
    gen = torch.Generator().manual_seed(11)
    shared = torch.randint(3, model.args.vocab_size, (130,), generator=gen).tolist()
    out = [torch.randint(3, model.args.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]
    # two that share a 2-block prefix with another: prefix hits in the engine's own blocks
    return out + [shared + [5, 6, 7], shared + [8]]


@pytest.fixture(scope="module")
def expected(tiny_mtp, prompts):
    ref = load_reference(tiny_mtp)  # transformers skips the MTP layer's tensors (unexpected keys)
    return [reference_greedy(ref, p, m) for p, m in zip(prompts, MAX_TOKENS + [24, 24])]


def greedy(prompts):
    return {f"r{i}": (p, SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS + [24, 24]))}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_greedy_tokens_equal_without_speculation_and_transformers(model, prompts, expected, n):
    engine = Engine(model, EngineConfig(kv_cache_bytes=200 * block_bytes(model), max_num_batched_tokens=128,
                                        speculative_tokens=n))
    arrivals = {f"r{i}": 0 if i < len(LENGTHS) else 40 + i for i in range(len(prompts))}  # the last two hit
    outputs = run(engine, greedy(prompts), arrivals)
    baseline = run(Engine(model, EngineConfig(kv_cache_bytes=200 * block_bytes(model), max_num_batched_tokens=128)),
                   greedy(prompts), arrivals)
    assert outputs == baseline
    covered = 0
    for i, exp in enumerate(expected):
        assert outputs[f"r{i}"][:exp.trusted] == exp.tokens[:exp.trusted], f"prompt {i}"
        covered += exp.trusted
    assert covered >= 0.8 * sum(len(e.tokens) for e in expected)
    assert engine.spec.num_drafts > 0 and engine.spec.num_draft_tokens >= engine.spec.num_drafts
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.runner.pool.kv.shape[0] == model.args.num_hidden_layers + 1  # the MTP layer's own KV


@pytest.mark.parametrize("n", [1, 3])
def test_preemption_with_speculation_keeps_the_tokens(model, prompts, expected, n):
    engine = Engine(model, EngineConfig(kv_cache_bytes=6 * block_bytes(model), max_num_batched_tokens=256,
                                        speculative_tokens=n))
    outputs = run(engine, greedy(prompts))
    assert engine.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
    for i, exp in enumerate(expected):
        assert outputs[f"r{i}"][:exp.trusted] == exp.tokens[:exp.trusted], f"prompt {i}"
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_seeded_sampling_is_the_same_with_and_without_speculation(model, prompts):
    requests = {f"s{i}": (p, SamplingParams(max_tokens=24, temperature=0.8, top_k=40 if i % 2 else 0,
                                            top_p=0.9 if i % 3 else 1.0, seed=100 + i, ignore_eos=True))
                for i, p in enumerate(prompts)}
    outs = [run(Engine(model, EngineConfig(speculative_tokens=n, max_num_batched_tokens=256)), requests)
            for n in (0, 1, 2, 3)]
    assert outs[1] == outs[0] and outs[2] == outs[0] and outs[3] == outs[0]


def test_no_block_leaks_after_a_thousand_requests_with_aborts(model):
    engine = Engine(model, EngineConfig(kv_cache_bytes=40 * block_bytes(model), max_num_seqs=48,
                                        max_num_batched_tokens=256, speculative_tokens=2))
    rng = random.Random(3)
    live: set[str] = set()
    added = aborted = 0
    while added < 1000 or engine.has_unfinished():
        while added < 1000 and len(live) < 48:
            rid = f"q{added}"
            prompt = [rng.randrange(3, model.args.vocab_size) for _ in range(rng.randrange(1, 40))]
            params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=rng.choice([0.0, 1.0]),
                                    seed=added, ignore_eos=rng.random() < 0.5)
            engine.add_request(rid, prompt, params)
            live.add(rid)
            added += 1
        if live and rng.random() < 0.5:
            victim = rng.choice(sorted(live))
            aborted += engine.abort(victim)
            live.discard(victim)
        for delta in engine.step():
            if delta.finish_reason:
                live.discard(delta.request_id)
    assert aborted > 30 and engine.spec.num_draft_tokens > 1000
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
    assert not engine.sequences and not engine.scheduler.running


def test_drafts_stop_at_max_tokens_and_never_pass_the_context(model):
    engine = Engine(model, EngineConfig(speculative_tokens=3))
    context = model.args.max_position_embeddings
    outputs = run(engine, {"a": ([7] * 10, SamplingParams(max_tokens=2, ignore_eos=True)),
                           "b": ([9] * (context - 3), SamplingParams(max_tokens=3, ignore_eos=True))})
    assert len(outputs["a"]) == 2 and len(outputs["b"]) == 3
    assert engine.spec.num_draft_tokens <= 1 + 2  # a: one draft (one token left), b: two, then one


def test_speculation_needs_an_mtp_layer(tiny_fp32):
    plain = load_model(tiny_fp32, dtype="fp32")
    with pytest.raises(ValueError, match="speculative_tokens=2: the model has no MTP layer"):
        Engine(plain, EngineConfig(speculative_tokens=2))
    assert resolve_speculative_tokens("auto", False) == 0 and resolve_speculative_tokens("auto", True) == 1
    with pytest.raises(ValueError, match=r"--speculative-tokens=1: the model has no MTP layer"):
        resolve_speculative_tokens(1, False)
    assert speculative_tokens_flag(" 3 ") == 3 and speculative_tokens_flag("auto") == "auto"
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(FlagValueError, match="expected auto or a whole number"):
            speculative_tokens_flag(bad)


def test_the_mtp_layer_loads_and_shares_the_main_copies(model, tiny_fp32):
    assert model.mtp is not None and len(model.main_layers) == model.args.num_hidden_layers
    assert model.mtp.embed_tokens.weight is model.model.embed_tokens.weight
    assert model.mtp.shared_head.head.weight is model.lm_head.weight
    plain = load_model(tiny_fp32, dtype="fp32")
    for name, tensor in plain.state_dict().items():  # init-model --mtp leaves the main model as it was
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_sampler_probs_is_what_a_row_draws_from(model):
    logits = torch.randn(model.args.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
    probs = Sampler.probs(logits, p)
    assert abs(float(probs.sum()) - 1) < 1e-5 and int((probs > 0).sum()) <= 20
    draws = [Sampler._draw(logits, p, seed) for seed in range(4000)]
    top = int(probs.argmax())
    assert abs(draws.count(top) / 4000 - float(probs[top])) < 0.03


def prefill_then_decode(model, requests: dict, n: int) -> tuple[dict, Engine, dict]:
    """The services' split, in process: a prefill engine's handoffs (KV with the MTP layer's, the
    last hidden state) admitted by a decode engine speculating with n drafts."""
    prefill = Engine(model, EngineConfig(mode="prefill", max_num_batched_tokens=256, speculative_tokens=n))
    decode = Engine(model, EngineConfig(mode="decode", speculative_tokens=n))
    for rid, (prompt, params) in requests.items():
        prefill.add_request(rid, prompt, params)
    handed, streamed = {}, {}
    while prefill.has_unfinished():
        # the MTP layer's KV streams after the main layers', as one more layer
        for delta in prefill.step(lambda layer, items: [streamed.setdefault(rid, []).append((layer, kv))
                                                        for rid, kv in items]):
            handed[delta.request_id] = delta
    outputs = {}
    for rid, (prompt, params) in requests.items():
        delta = handed[rid]
        outputs[rid] = list(delta.token_ids)
        if delta.finish_reason is None:
            assert decode.add_prefilled(rid, prompt, params, delta.token_ids[0], delta.kv, None, delta.hidden)
    while decode.has_unfinished():
        for delta in decode.step():
            outputs[delta.request_id].extend(delta.token_ids)
    assert prefill.blocks.num_free == prefill.blocks.num_blocks
    return outputs, decode, {rid: (handed[rid], streamed.get(rid, [])) for rid in requests}


def test_prefill_hands_the_mtp_layer_to_decode(model, prompts, expected):
    requests = greedy(prompts)
    outputs, decode, handed = prefill_then_decode(model, requests, 2)
    for i, exp in enumerate(expected):
        assert outputs[f"r{i}"][:exp.trusted] == exp.tokens[:exp.trusted], f"prompt {i}"
    layers = model.args.num_hidden_layers
    for rid, (delta, streamed) in handed.items():
        prompt = requests[rid][0]
        assert [layer for layer, _ in streamed] == list(range(layers + 1))  # the MTP layer's last
        assert delta.kv.shape[:2] == (layers + 1, len(prompt)) and delta.hidden.shape == (model.args.hidden_size,)
        torch.testing.assert_close(streamed[-1][1], delta.kv[layers], rtol=0, atol=0)
    # the MTP layer's rows over the prompt are those the in-process engine computes
    mixed = Engine(model, EngineConfig(speculative_tokens=2))
    prompt, params = requests["r6"]
    mixed.add_request("r6", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    while mixed.sequences["r6"].mtp_computed < len(prompt):
        mixed.step()
    rows = mixed.runner.pool.kv[layers, mixed.runner.slots(mixed.sequences["r6"], len(prompt))]
    torch.testing.assert_close(handed["r6"][0].kv[layers], rows)
    assert decode.spec.num_drafts > 0 and decode.blocks.num_free == decode.blocks.num_blocks


def test_a_handoff_without_the_mtp_layer_is_refused(model):
    decode = Engine(model, EngineConfig(mode="decode", speculative_tokens=1))
    layers, width = model.args.num_hidden_layers, model.args.kv_cache_dim
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    with pytest.raises(RequestError, match="kv: shape .*expected 4 layers"):
        decode.add_prefilled("a", [5, 6, 7], params, 9, torch.zeros(layers, 3, width))
    with pytest.raises(RequestError, match="hidden: missing"):
        decode.add_prefilled("b", [5, 6, 7], params, 9, torch.zeros(layers + 1, 3, width))
    assert decode.blocks.num_free == decode.blocks.num_blocks and not decode.sequences


def test_a_prefix_from_the_cache_gets_its_last_mtp_row_again(model):
    """The on-disk cache's KV of a 128-token prefix carries the MTP row at position 127, computed
    with the token that followed it then; a prompt going on differently recomputes that position."""
    gen = torch.Generator().manual_seed(12)
    first = torch.randint(3, model.args.vocab_size, (140,), generator=gen).tolist()
    second = first[:128] + [first[128] + 1, 9, 10]  # the same two blocks, then another token
    mtp = model.args.num_hidden_layers
    prefill = Engine(model, EngineConfig(mode="prefill"))
    prefill.add_request("first", first, SamplingParams(max_tokens=2, ignore_eos=True))
    (stored,) = [d.kv[:, :128] for d in prefill.step()]  # what the prefix cache keeps of two blocks

    def mtp_rows(engine, rid, prompt):
        while engine.sequences[rid].mtp_computed < len(prompt):
            engine.step()
        return engine.runner.pool.kv[mtp, engine.runner.slots(engine.sequences[rid], len(prompt))]

    cached = Engine(model, EngineConfig(speculative_tokens=2))
    cached.add_request("second", second, SamplingParams(max_tokens=4, ignore_eos=True), prefix_kv=stored)
    fresh = Engine(model, EngineConfig(speculative_tokens=2))
    fresh.add_request("second", second, SamplingParams(max_tokens=4, ignore_eos=True))
    got, want = mtp_rows(cached, "second", second), mtp_rows(fresh, "second", second)
    assert cached.sequences["second"].num_cached_prompt == 128
    assert not torch.allclose(stored[mtp, 127], want[127], atol=1e-4)  # the stored row was another's
    torch.testing.assert_close(got, want)  # every row the one the new prompt gives, 127 included
    torch.testing.assert_close(cached.runner.pool.kv[:mtp, cached.runner.slots(cached.sequences["second"], 128)],
                               stored[:mtp])  # the main layers' cached KV as it was


class Fault(Exception):
    """An exchange failing in the MTP layer (EP: a rank died mid-step)."""


def fail_mtp_once(engine: Engine, at_call: int) -> list[int]:
    """The engine's `at_call`-th MTP forward raises Fault, once; -> the calls so far (a counter)."""
    calls, run_mtp = [0], engine.runner.run_mtp

    def flaky(*args):
        calls[0] += 1
        if calls[0] == at_call:
            raise Fault()
        return run_mtp(*args)

    engine.runner.run_mtp = flaky
    return calls


def test_a_failed_mtp_exchange_loses_no_token(model, prompts):
    requests = greedy(prompts[:4])
    expected = run(Engine(model, EngineConfig(speculative_tokens=2)), requests)
    for at_call in (1, 2, 5, 6):  # a catch-up, a further draft, later ones
        engine = Engine(model, EngineConfig(speculative_tokens=2))
        fail_mtp_once(engine, at_call)
        for rid, (prompt, params) in requests.items():
            engine.add_request(rid, prompt, params)
        outputs, failures = {rid: [] for rid in requests}, 0
        while engine.has_unfinished():
            try:
                deltas = engine.step()
            except Fault:
                failures += 1
                continue
            for delta in deltas:
                assert delta.index == len(outputs[delta.request_id])  # in order, none missing or twice
                outputs[delta.request_id].extend(delta.token_ids)
        assert failures == 1 and outputs == expected, at_call
        assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_failed_mtp_exchange_in_prefill_computes_the_prompt_again(model, prompts):
    requests = greedy(prompts[3:6])
    want, _, _ = prefill_then_decode(model, requests, 2)
    prefill = Engine(model, EngineConfig(mode="prefill", max_num_batched_tokens=512))
    fail_mtp_once(prefill, 1)
    for rid, (prompt, params) in requests.items():
        prefill.add_request(rid, prompt, params)
    with pytest.raises(Fault):
        prefill.step()
    handed = {}
    while prefill.has_unfinished():
        for delta in prefill.step():
            handed[delta.request_id] = delta
    assert prefill.scheduler.num_preemptions == len(requests)  # each prompt computed again
    assert {rid: d.token_ids for rid, d in handed.items()} == {rid: want[rid][:1] for rid in requests}
    assert all(d.hidden is not None and d.kv.shape[0] == model.args.num_kv_layers for d in handed.values())
    assert prefill.blocks.num_free == prefill.blocks.num_blocks
