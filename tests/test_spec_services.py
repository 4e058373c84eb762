"""Speculative decoding through the services (tiny fp32 with a distilled MTP layer, N = 2): prefill
hands the MTP layer's KV and the prompt's last hidden state to decode with the rest of the
handoff; decode drafts and verifies; a decode rank killed mid-request is resumed by its successor,
which speculates on; a prompt served again hits the prefix cache. Every token is transformers'
(up to its first near-tie), none missing or repeated, and the acceptance counters show drafts
accepted."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import torch
from distilled import QUICK
from procs import ServiceProcess, metric, stop_all
from reference import load_reference, reference_greedy
from test_resume import start_services, stream_tokens, until_all_run_on

from shared.cost.metrics_report import sample_sum
from shared.model import distill
from shared.protocol import metric_names

N = 2


@pytest.fixture(scope="module")
def services(distilled_mtp, redis_url, tmp_path_factory):
    model, _ = distilled_mtp
    started = start_services(model, redis_url, tmp_path_factory.mktemp("spec-blocks"), "spec-victim",
                             "--speculative-tokens", str(N))
    yield started
    stop_all(s for s in started.values() if isinstance(s, ServiceProcess))


def spec_counters(decode: ServiceProcess) -> tuple[float, float, float, float]:
    """drafts, draft tokens, accepted tokens, accepted at the first position: from one scrape (the
    rank goes on speculating between two)."""
    with urllib.request.urlopen(decode.url("/metrics"), timeout=10) as r:
        text = r.read().decode()
    return (sample_sum(text, metric_names.sample(metric_names.SPEC_DRAFTS)),
            sample_sum(text, metric_names.sample(metric_names.SPEC_DRAFT_TOKENS)),
            sample_sum(text, metric_names.sample(metric_names.SPEC_ACCEPTED_TOKENS)),
            sample_sum(text, metric_names.sample(metric_names.SPEC_ACCEPTED_PER_POS), position="0"))


async def test_speculation_through_the_services_survives_a_decode_rank_kill(services, distilled_mtp, redis_url,
                                                                          tmp_path):
    from redis.asyncio import Redis

    path, _ = distilled_mtp
    # prompts the quick distillation trained on: its layer accepts a few percent of the drafts there
    # (about as many as on new prompts), enough over ~700 drafts to be sure the accept path runs
    gen = torch.Generator().manual_seed(3)
    prompts = [distill._random_prompt(gen, 1024, QUICK.prompt_len) for _ in range(6)]
    shared_prefix = torch.randint(3, 1024, (130,), generator=torch.Generator().manual_seed(91)).tolist()
    prompts.append(shared_prefix + [7, 8])
    max_tokens = 96
    body = {"model": path.resolve().name, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    client = Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as session:
        running = [asyncio.create_task(stream_tokens(session, services["gateway"], {**body, "prompt": p}))
                   for p in prompts]
        await until_all_run_on(client, "spec-victim", len(prompts), 8)  # then kill -9
        victim = spec_counters(services["decode"])
        services["decode"].proc.kill()
        services["decode"].proc.wait()
        services["decode"] = ServiceProcess("services.decode", redis_url, *services["worker"],
                                            instance_id="spec-successor")
        results = await asyncio.wait_for(asyncio.gather(*running), 120)
        # the same long prompt again, and one sharing its first two blocks: prefix cache hits
        again = [shared_prefix + [7, 8], shared_prefix + [9]]
        hits = await asyncio.wait_for(asyncio.gather(*[
            stream_tokens(session, services["gateway"], {**body, "prompt": p}) for p in again]), 120)
        # the load generator reads the same counters through the gateway's /services, before and after
        before = spec_counters(services["decode"])
        out = tmp_path / "loadgen.json"
        done = subprocess.run([sys.executable, "-m", "loadgen", "--url", services["gateway"].url(""), "--out", str(out),
                               "--no-progress", "--workload", "random", "--num-requests", "6", "--input-len", "16",
                               "--output-len", "48", "--vocab-size", "1024"],
                              cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        gained = [a - b for a, b in zip(spec_counters(services["decode"]), before)]
    await client.aclose()
    result = json.loads(out.read_text())
    assert result["spec_decode_num_drafts"] == gained[0] > 0
    assert result["spec_decode_acceptance_rate"] == pytest.approx(gained[2] / gained[1])
    assert result["spec_decode_mean_acceptance_length"] == pytest.approx(1 + gained[2] / gained[0])
    assert result["spec_decode_acceptance_rate_per_pos"][0] == pytest.approx(gained[3] / gained[0])
    assert len(result["spec_decode_acceptance_rate_per_pos"]) == N
    assert "Draft acceptance rate:" in done.stdout
    assert metric(services["balancer"], "streamoe_requests_resumed_total", outcome="resumed") == len(prompts)
    ref = load_reference(path)
    for prompt, (tokens, usage) in zip(prompts + again, results + hits):
        assert len(tokens) == max_tokens and usage["completion_tokens"] == max_tokens  # none missing, none twice
        expected = reference_greedy(ref, prompt, max_tokens)
        assert tokens[:expected.trusted] == expected.tokens[:expected.trusted]
        assert expected.trusted >= 16
    assert hits[0][1]["prompt_tokens_details"]["cached_tokens"] >= 128
    assert hits[1][1]["prompt_tokens_details"]["cached_tokens"] >= 128
    # both decode instances speculated, and drafts were accepted: on the victim before the kill,
    # and on the successor, which carried the resumed requests on
    successor = spec_counters(services["decode"])
    for drafts, draft_tokens, accepted, first in (victim, successor):
        assert drafts > 0 and drafts <= draft_tokens <= N * drafts
        assert first <= accepted <= draft_tokens
    assert successor[2] > 0 and successor[3] > 0, successor  # the accept path ran on the resumed requests
