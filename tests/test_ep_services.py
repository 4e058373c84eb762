"""Expert parallelism across processes over Redis: a prefill EP group and a decode EP group of two
ranks each, behind the real gateway, tokenizer and balancer."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import torch
from procs import ServiceProcess, greedy_token_ids, metric, stop_all
from reference import load_reference, reference_greedy

from loadgen.client import Client, Result
from loadgen.workloads import Request


@pytest.fixture(scope="module")
def ep_system(tiny_fp32, redis_url, tmp_path_factory):
    import redis as sync_redis

    sync_redis.Redis.from_url(redis_url).flushdb()
    blocks = tmp_path_factory.mktemp("ep-blocks")
    cache = ["--cache-dir", str(blocks), "--cache-capacity-mib", "64"]
    # every block write waits 1 s: the two prefill ranks, which step together, write at the same moment
    common = ["--model", str(tiny_fp32), "--dtype", "fp32", "--threads", "1", "--kv-cache-mib", "32",
              "--ep-size", "2", "--ep-wire", "exact", "--ep-timeout-s", "4", "--num-redundant-experts", "2",
              "--housekeeping-s", "0.5", *cache, "--cache-write-delay-s", "1"]
    started = {"tokenizer": ServiceProcess("services.tokenizer", redis_url, "--model", str(tiny_fp32)),
               "cache": ServiceProcess("services.cache", redis_url, "--model", str(tiny_fp32), "--dtype", "fp32",
                                       *cache),
               "balancer": ServiceProcess("services.balancer", redis_url, "--eplb-interval-s", "1",
                                          "--eplb-min-tokens", "300", "--eplb-min-gain", "0.01")}
    # NOTE: a rank is ready only once its whole group has joined: start both, then wait.
    for role in ("prefill", "decode"):
        pending = [ServiceProcess(f"services.{role}", redis_url, *common, "--rank", str(r), wait=False)
                   for r in range(2)]
        for r, service in enumerate(pending):
            service.wait_healthy()
            started[f"{role}{r}"] = service
    started["gateway"] = ServiceProcess("services.gateway", redis_url, "--model", str(tiny_fp32),
                                        "--request-timeout-s", "60")
    started["blocks"], started["worker_args"] = blocks, common
    yield started
    stop_all(s for s in started.values() if isinstance(s, ServiceProcess))


async def test_ep2_groups_serve_transformers_tokens(ep_system, tiny_fp32):
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() for n in (5, 40, 77, 130, 9, 64)]
    model = tiny_fp32.resolve().name

    async def one(session, prompt):
        return await greedy_token_ids(session, ep_system["gateway"], model, prompt, 8)

    async with aiohttp.ClientSession() as session:
        outputs = await asyncio.gather(*[one(session, p) for p in prompts])
    ref = load_reference(tiny_fp32)
    for prompt, tokens in zip(prompts, outputs):
        expected = reference_greedy(ref, prompt, 8)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
    for role in ("prefill", "decode"):
        for r in range(2):
            service = ep_system[f"{role}{r}"]
            # its half of the 16 + 2 expert slots of each of the 2 MoE layers: 9 experts x 3 matrices
            assert metric(service, "streamoe_expert_weight_bytes") == 2 * 9 * 3 * 128 * 64 * 4
            assert metric(service, "streamoe_ep_dispatched_tokens_total", peer=str(1 - r)) > 0
            assert metric(service, "streamoe_ep_sent_bytes_total", phase="dispatch") > 0


async def test_eplb_rolls_out_while_requests_stream(ep_system, tiny_fp32):
    """The balancer computes placements from the ranks' expert load and both groups switch to
    them while requests keep coming: every request completes with the reference's tokens."""
    gen = torch.Generator().manual_seed(9)
    model = tiny_fp32.resolve().name
    ref = load_reference(tiny_fp32)

    def switched(role: str) -> bool:
        return all('"placement_switched"' in ep_system[f"{role}{r}"].log_tail(200000) for r in range(2))

    async def one(session, prompt):
        return prompt, await greedy_token_ids(session, ep_system["gateway"], model, prompt, 6)

    done = []
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession() as session:
        while not (switched("prefill") and switched("decode")) and time.monotonic() < deadline:
            batch = [torch.randint(3, 1024, (int(n),), generator=gen).tolist()
                     for n in torch.randint(20, 200, (4,), generator=gen)]
            done += await asyncio.gather(*[one(session, p) for p in batch])
    assert switched("prefill") and switched("decode"), "no placement was rolled out"
    async with aiohttp.ClientSession() as session:  # and after the switch
        done += await asyncio.gather(*[one(session, torch.randint(3, 1024, (50,), generator=gen).tolist())
                                       for _ in range(4)])
    for prompt, tokens in done:
        expected = reference_greedy(ref, prompt, 6)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]


async def test_two_prefill_ranks_writing_the_same_blocks_leave_one_good_copy(ep_system, tiny_fp32):
    """The same prompt twice at once: the balancer sends one to each prefill rank, both ranks (and
    then both decode ranks) write its blocks at the same moment; each block is one file that
    verifies, no temporary file is left, and the prompt hits the cache afterwards."""
    from shared.cache.hashing import chain_hashes, root_hash
    from shared.cache.store import BlockStore
    from shared.model.loader import checkpoint_fingerprint

    gen = torch.Generator().manual_seed(10)
    prompt = torch.randint(3, 1024, (200,), generator=gen).tolist()
    model = tiny_fp32.resolve().name
    ranks = [f"{role}{r}" for role in ("prefill", "decode") for r in range(2)]

    def writes() -> dict[str, float]:
        return {name: metric(ep_system[name], "streamoe_cache_write_seconds_count") for name in ranks}

    before = writes()  # the earlier tests' writes land late (each waits 1 s): let them all land first
    while True:
        await asyncio.sleep(1.5)
        settled, before = before, writes()
        if settled == before:
            break
    async with aiohttp.ClientSession() as session:
        first, second = await asyncio.gather(*[greedy_token_ids(session, ep_system["gateway"], model, prompt, 2)
                                               for _ in range(2)])
        assert first == second
        deadline = time.monotonic() + 30
        while any(writes()[n] == before[n] for n in ranks) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        after = writes()
        assert all(after[n] > before[n] for n in ranks), (before, after)  # each rank took one and wrote
        store = BlockStore(ep_system["blocks"], 64 << 20)
        root = root_hash(checkpoint_fingerprint(tiny_fp32, torch.float32))
        for i, h in enumerate(chain_hashes(root, prompt)):
            assert store.path_of(h.hex()).exists()
            assert store.get(h.hex(), prompt[i * 64:(i + 1) * 64]) is not None
        assert not list(ep_system["blocks"].glob("*/.*.tmp"))  # the losers' temporary files are gone
        body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        async with session.post(ep_system["gateway"].url("/v1/completions"), json=body) as r:
            again = await r.json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 192
    assert again["choices"][0]["token_ids"] == first


async def until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.25)


async def test_groups_re_form_without_a_dead_rank_and_take_it_back(ep_system, tiny_fp32, redis_url):
    """kill -9 one rank of each group while requests stream: the survivors re-form their groups
    without it (the exchange timeout, then the roll call), serve on alone with the right tokens
    (the requests routed to the dead ranks included), and take a new process for the rank back
    in; every request completes with the right tokens."""
    model = tiny_fp32.resolve().name
    gateway = ep_system["gateway"]
    ref = load_reference(tiny_fp32)
    gen = torch.Generator().manual_seed(12)

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(3, 1024, (int(k),), generator=gen).tolist()
                for k in torch.randint(8, 120, (n,), generator=gen)]

    def check(prompt: list[int], tokens: list[int], max_tokens: int) -> None:
        expected = reference_greedy(ref, prompt, max_tokens)
        assert len(tokens) == max_tokens and tokens[:expected.trusted] == expected.tokens[:expected.trusted]

    def members(role: str, r: int) -> float:
        return metric(ep_system[f"{role}{r}"], "streamoe_ep_group_members")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        client = Client(session, gateway.url("").rstrip("/"), model)
        before = prompts(4)
        results = [Result(80, 0.0) for _ in before]
        streaming = [asyncio.create_task(client.send(Request(80, p), r)) for p, r in zip(before, results)]
        await until(lambda: all(len(r.token_ids) >= 2 for r in results), "every request streams")
        for role in ("prefill", "decode"):
            ep_system[f"{role}1"].kill()
        started = time.monotonic()
        # sent at once: the dead ranks' last load reports still stand, so the balancer routes some
        # there; it takes them back from the dead ranks' streams once the reports have lapsed
        early = prompts(4)
        early_outputs = asyncio.gather(*[greedy_token_ids(session, gateway, model, p, 12) for p in early])
        await until(lambda: members("prefill", 0) == members("decode", 0) == 1, "the survivors re-form", 30)
        assert time.monotonic() - started < 4 + 3 + 5  # the exchange timeout, the roll call, reading experts
        for role in ("prefill", "decode"):
            assert ep_system[f"{role}0"].proc.poll() is None
            assert metric(ep_system[f"{role}0"], "streamoe_ep_reforms_total", change="shrink") == 1
        await asyncio.sleep(5)  # the dead ranks' load reports expire: the balancer routes to the survivors
        alone = prompts(3)
        outputs = await asyncio.gather(*[greedy_token_ids(session, gateway, model, p, 12) for p in alone])
        for prompt, tokens in zip(alone, outputs):
            check(prompt, tokens, 12)
        for prompt, tokens in zip(early, await early_outputs):  # all before the dead ranks come back
            check(prompt, tokens, 12)
        assert metric(ep_system["balancer"], "streamoe_orphaned_requests_moved_total") >= 1

        common = ep_system["worker_args"]
        back = {role: ServiceProcess(f"services.{role}", redis_url, *common, "--rank", "1", wait=False)
                for role in ("prefill", "decode")}
        for role, service in back.items():
            ep_system[f"{role}1"] = service
            await asyncio.to_thread(service.wait_healthy)
        await until(lambda: all(members(role, r) == 2 for role in back for r in range(2)), "the groups are whole")
        for role in back:
            for r in range(2):  # at once: the members and the new process joined each other
                assert metric(ep_system[f"{role}{r}"], "streamoe_ep_reforms_total", change="grow") == 1
        sent_to_1 = metric(ep_system["decode0"], "streamoe_ep_dispatched_tokens_total", peer="1")
        whole = prompts(4)
        outputs = await asyncio.gather(*[greedy_token_ids(session, gateway, model, p, 12) for p in whole])
        for prompt, tokens in zip(whole, outputs):
            check(prompt, tokens, 12)
        assert metric(ep_system["decode0"], "streamoe_ep_dispatched_tokens_total", peer="1") > sent_to_1
        for role in back:
            for r in range(2):  # and stay joined
                assert metric(ep_system[f"{role}{r}"], "streamoe_ep_reforms_total") == (2 if r == 0 else 1)
        await asyncio.gather(*streaming)
    for prompt, result in zip(before, results):
        assert result.error is None, result.message
        check(prompt, result.token_ids, 80)


async def test_a_restarted_rank_announces_its_predecessor_dead(tiny_fp32, redis_url):
    """Kubernetes restarts a killed container in place, and no supervisor saw it die. The new
    process finds the load report its predecessor left and publishes a death notice for it
    (shared/runtime/notices.py): the survivor, blocked in an exchange with a 600 s timeout, re-forms
    without the dead incarnation at once (reason `notice`), then takes the new process in."""
    args = ["--model", str(tiny_fp32), "--dtype", "fp32", "--threads", "1", "--kv-cache-mib", "16",
            "--ep-size", "2", "--ep-wire", "exact", "--ep-timeout-s", "600", "--ep-group-id", "k8s-restart",
            "--load-ttl-s", "120", "--heartbeat-ttl-s", "120", "--rank-dead-after-s", "600"]
    ranks = [ServiceProcess("services.decode", redis_url, *args, "--rank", str(r), wait=False) for r in range(2)]
    try:
        for service in ranks:
            service.wait_healthy()

        def reforms(reason: str) -> float:
            return metric(ranks[0], "streamoe_ep_reforms_total", change="shrink", reason=reason)

        ranks[1].kill()  # kill -9: no hook runs, nobody announces it
        await asyncio.sleep(1.0)
        assert metric(ranks[0], "streamoe_ep_group_members") == 2  # the survivor still waits for it
        ranks[1] = ServiceProcess("services.decode", redis_url, *args, "--rank", "1", wait=False)
        await until(lambda: reforms("notice") == 1, "the survivor re-forms on the notice", 60)
        await asyncio.to_thread(ranks[1].wait_healthy)
        await until(lambda: metric(ranks[0], "streamoe_ep_group_members") == 2, "the group is whole again", 30)
        assert reforms("timeout") == 0
        assert '"predecessor_announced_dead"' in ranks[1].log_tail(200000)
    finally:
        stop_all(ranks)
