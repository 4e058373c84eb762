"""Several EP groups of one role on one Redis: each rank is named by its group (`--ep-group-id`)
and its rank in it, so two groups' rank 0 neither share an input stream nor a load report; the
balancer spreads requests over every rank of every group."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch
from procs import ServiceProcess, greedy_token_ids, metric, stop_all
from reference import load_reference, reference_greedy

from shared.protocol import streams

GROUPS = {"prefill": ["prefill", "p-east"], "decode": ["d.a", "d.b"]}  # the default group's id is its role


async def test_two_groups_of_each_role_share_the_work(tiny_fp32, redis_url, redis):
    worker = ["--model", str(tiny_fp32), "--dtype", "fp32", "--rank", "0", "--threads", "1", "--kv-cache-mib", "32"]
    services = {"tokenizer": ServiceProcess("services.tokenizer", redis_url, "--model", str(tiny_fp32)),
                "cache": ServiceProcess("services.cache", redis_url, "--model", str(tiny_fp32)),
                "balancer": ServiceProcess("services.balancer", redis_url)}
    try:
        for role, groups in GROUPS.items():
            for group in groups:
                services[group] = ServiceProcess(f"services.{role}", redis_url, *worker,
                                                 *([] if group == role else ["--ep-group-id", group]))
        services["gateway"] = ServiceProcess("services.gateway", redis_url, "--model", str(tiny_fp32))
        for role, groups in GROUPS.items():  # one load report each: neither rank 0 overwrites the other's
            assert all([await redis.exists(streams.load_key(role, g, 0)) for g in groups])
        gen = torch.Generator().manual_seed(14)
        prompts = [torch.randint(3, 1024, (int(n),), generator=gen).tolist()
                   for n in torch.randint(8, 150, (12,), generator=gen)]
        model = tiny_fp32.resolve().name
        async with aiohttp.ClientSession() as session:
            outputs = await asyncio.gather(*[greedy_token_ids(session, services["gateway"], model, p, 10)
                                             for p in prompts])
        ref = load_reference(tiny_fp32)
        for prompt, tokens in zip(prompts, outputs):
            expected = reference_greedy(ref, prompt, 10)
            assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
        for group in GROUPS["prefill"]:  # every rank of every group took part
            assert metric(services[group], "streamoe_kv_handoff_bytes_total") > 0, group
        for group in GROUPS["decode"]:
            assert metric(services[group], "streamoe_kv_handoff_received_bytes_total") > 0, group
    finally:
        stop_all(services.values())


def test_a_group_id_that_cannot_name_a_stream_is_refused(tiny_fp32, redis_url, capsys, monkeypatch):
    from services.decode.decode_rank import DecodeService
    from shared.runtime.engine_service import engine_main

    for bad in ("a:b", "*", "", "-x", "g" * 64):
        with pytest.raises(SystemExit) as e:
            engine_main(DecodeService, ["--model", str(tiny_fp32), "--redis-url", redis_url, f"--ep-group-id={bad}"])
        assert e.value.code == 2 and f"argument --ep-group-id: {bad!r}: 1-63 letters" in capsys.readouterr().err
    monkeypatch.setenv("STREAMOE_EP_GROUP_ID", "a:b")
    with pytest.raises(SystemExit) as e:
        engine_main(DecodeService, ["--model", str(tiny_fp32), "--redis-url", redis_url])
    assert e.value.code == 2
    assert "STREAMOE_EP_GROUP_ID='a:b': not a valid value for --ep-group-id: 'a:b': 1-63" in capsys.readouterr().err
