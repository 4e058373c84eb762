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
from distilled import trained_prompts
from procs import ServiceProcess, metric, stop_all
from reference import load_reference, reference_greedy
from test_resume import start_services, stream_tokens, until_all_run_on

from shared.cost.metrics_report import sample_sum
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


def greedy_streams(session, gateway: str, model: Path, prompts: list[list[int]],
                   max_tokens: int) -> list[asyncio.Task]:
    """One streamed greedy completion per prompt (ids back), each a running task."""
    body = {"model": model.resolve().name, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    return [asyncio.create_task(stream_tokens(session, gateway, {**body, "prompt": p})) for p in prompts]


async def test_speculation_through_the_services_survives_a_decode_rank_kill(services, distilled_mtp, redis_url,
                                                                          tmp_path):
    from redis.asyncio import Redis

    path, _ = distilled_mtp
    prompts = trained_prompts(6, prefix_seed=91, tail=[7, 8])  # ~700 drafts in all
    max_tokens = 96
    client = Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as session:
        running = greedy_streams(session, services["gateway"], path, prompts, max_tokens)
        await until_all_run_on(client, "spec-victim", len(prompts), 8)  # then kill -9
        victim = spec_counters(services["decode"])
        services["decode"].proc.kill()
        services["decode"].proc.wait()
        services["decode"] = ServiceProcess("services.decode", redis_url, *services["worker"],
                                            instance_id="spec-successor")
        results = await asyncio.wait_for(asyncio.gather(*running), 120)
        # the same long prompt again, and one sharing its first two blocks: prefix cache hits
        again = [prompts[-1], prompts[-1][:-2] + [9]]
        hits = await asyncio.wait_for(asyncio.gather(
            *greedy_streams(session, services["gateway"], path, again, max_tokens)), 120)
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
