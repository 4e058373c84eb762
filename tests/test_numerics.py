"""Issue #15: `--dtype auto` / `--moe-backend auto` chosen by measurement, cached, agreed through
Redis, shown on /health; a KV handoff in another dtype refused naming both."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from shared.model.experts import MoEPlan
from shared.protocol import streams
from shared.runtime import numerics
from shared.runtime.numerics import Numerics, Shapes, Timings, agree, cache_key, plan_of, resolve, wait_published
from shared.runtime.service import ServiceConfig


def counting_measure():
    """`measure`, counting its calls by dtype."""
    calls: list[torch.dtype] = []

    def measure(shapes, dtype, device, backends, stop_after, deadline):
        calls.append(dtype)
        return numerics.measure(shapes, dtype, device, backends, stop_after, deadline)

    return measure, calls


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMOE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    from shared.model.presets import init_model

    return init_model(tmp_path_factory.mktemp("tiny-bf16"), "tiny", seed=0, dtype="bf16")


def test_calibration_is_cached_and_reused(tiny_fp32, home):
    shapes = Shapes.of_model(tiny_fp32)
    measure, calls = counting_measure()
    first = resolve(shapes, "cpu", 1, measure_fn=measure)
    assert first.source == "measured" and calls == [torch.float32]
    MoEPlan.parse(first.moe_backend)
    files = list((home / "numerics").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["moe_backend"] == first.moe_backend
    again = resolve(shapes, "cpu", 1, measure_fn=measure)
    assert again == dataclasses.replace(first, source="cached") and len(calls) == 1  # no new measurement
    # a new torch, other shapes or another thread count measure again, under another key
    assert resolve(shapes, "cpu", 1, measure_fn=measure, torch_version="99.0").source == "measured"
    assert len(calls) == 2
    wider = dataclasses.replace(shapes, moe_inter=shapes.moe_inter * 2)
    assert resolve(wider, "cpu", 1, measure_fn=measure).source == "measured" and len(calls) == 3
    assert len(list((home / "numerics").glob("*.json"))) == 3


def test_cache_key_takes_every_input():
    shapes = Shapes(128, 64, 16, 4, 256, "bfloat16")
    key = cache_key("cpu|X|avx512", "2.13.0", "cpu", shapes, 2, "auto", "auto")
    assert key == cache_key("cpu|X|avx512", "2.13.0", "cpu", shapes, 2, "auto", "auto")
    others = [cache_key("cpu|Y|avx2", "2.13.0", "cpu", shapes, 2, "auto", "auto"),
              cache_key("cpu|X|avx512", "2.14.0", "cpu", shapes, 2, "auto", "auto"),
              cache_key("cpu|X|avx512", "2.13.0", "cuda", shapes, 2, "auto", "auto"),
              cache_key("cpu|X|avx512", "2.13.0", "cpu", dataclasses.replace(shapes, experts=32), 2, "auto", "auto"),
              cache_key("cpu|X|avx512", "2.13.0", "cpu", dataclasses.replace(shapes, checkpoint_dtype="float32"), 2,
                        "auto", "auto"),
              cache_key("cpu|X|avx512", "2.13.0", "cpu", shapes, 1, "auto", "auto"),
              cache_key("cpu|X|avx512", "2.13.0", "cpu", shapes, 2, "fp32", "auto")]
    assert len({key, *others}) == 1 + len(others)


def test_an_fp32_checkpoint_is_never_calibrated_to_bf16(tiny_fp32, home):
    measure, calls = counting_measure()
    chosen = resolve(Shapes.of_model(tiny_fp32), "cpu", 1, measure_fn=measure)
    assert chosen.dtype == "fp32" and set(calls) == {torch.float32}


def test_a_bf16_checkpoint_tries_bf16_and_fp32(tiny_bf16, home):
    measure, calls = counting_measure()
    chosen = resolve(Shapes.of_model(tiny_bf16), "cpu", 1, measure_fn=measure)
    assert chosen.dtype in ("bf16", "fp32") and chosen.source == "measured"
    assert calls == [torch.bfloat16, torch.float32]
    assert MoEPlan.parse(chosen.moe_backend).text == chosen.moe_backend


def test_the_faster_dtype_and_each_buckets_backend_win(tiny_bf16, home):
    """With made-up timings: fp32 faster overall; loop fastest to 4 tokens, weight-major above."""
    def fake(shapes, dtype, device, backends, stop_after, deadline):
        scale = 2.0 if dtype == torch.bfloat16 else 1.0
        fastest = {1: "loop", 4: "loop", 16: "weight-major", 64: "weight-major", 256: "weight-major"}
        moe = {b: {name: scale * (1.0 if name == fastest[b] else 2.0) for name in backends} for b in numerics.BUCKETS}
        return Timings(moe, {b: 0.1 for b in numerics.BUCKETS})

    chosen = resolve(Shapes.of_model(tiny_bf16), "cpu", 1, measure_fn=fake)
    assert (chosen.dtype, chosen.moe_backend) == ("fp32", "1:loop,8:weight-major")


def test_explicit_values_are_kept(tiny_fp32, home):
    measure, calls = counting_measure()
    shapes = Shapes.of_model(tiny_fp32)
    assert resolve(shapes, "cpu", 1, "bf16", "loop", measure_fn=measure) == Numerics("bf16", "loop", "flag")
    assert resolve(shapes, "cpu", 1, "auto", "bmm", measure_fn=measure) == Numerics("fp32", "bmm", "flag")
    assert calls == []  # nothing left to measure
    chosen = resolve(shapes, "cpu", 1, "bf16", "auto", measure_fn=measure)
    assert chosen.dtype == "bf16" and calls == [torch.bfloat16]  # only the backend is calibrated


def test_plan_merges_buckets_and_keeps_near_ties():
    timings = Timings({1: {"loop": 1.0, "bmm": 3.0}, 4: {"loop": 1.0, "bmm": 3.0}, 16: {"loop": 3.0, "bmm": 1.0},
                       64: {"loop": 1.02, "bmm": 1.0}, 256: {"loop": 3.0, "bmm": 1.0}}, {})
    assert plan_of(timings).text == "1:loop,8:bmm"
    same = Timings({b: {"loop": 2.0, "grouped": 1.0} for b in numerics.BUCKETS}, {})
    assert plan_of(same).text == "grouped"


def test_a_busy_machine_decides_on_what_it_measured(tiny_bf16, home, monkeypatch):
    """Past the calibration's budget it stops measuring: the plan covers the buckets it finished,
    and the dtype it had no time to finish (the second) does not win."""
    monkeypatch.setattr(numerics, "CALIBRATION_BUDGET_S", 0.0)
    measure, calls = counting_measure()
    chosen = resolve(Shapes.of_model(tiny_bf16), "cpu", 1, measure_fn=measure)
    assert chosen.dtype == "bf16" and calls == [torch.bfloat16, torch.float32]
    record = json.loads(next((home / "numerics").glob("*.json")).read_text())
    assert list(record["timings"]["bf16"]["moe"]) == ["1"] and record["timings"]["fp32"]["complete"] is False
    MoEPlan.parse(chosen.moe_backend)


def test_real_deepseek_shapes_are_capped():
    v3 = Shapes(7168, 2048, 256, 8, 18432, "bfloat16")
    assert v3.slots == 8  # at least top-K, though 8 fp32 experts pass the budget
    assert Shapes(1024, 256, 64, 6, 2048, "bfloat16").slots == 64  # small: the whole layer fits
    assert Shapes(2048, 512, 256, 8, 8192, "bfloat16").slots == (256 << 20) // (3 * 2048 * 512 * 4) == 21


# --- flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--moe-backend", "--dtype"])
def test_generate_refuses_a_bad_value_naming_it(tiny_fp32, capsys, flag):
    from shared.launcher.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny_fp32), "--prompt", "hi", flag, "nonsense"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and "'nonsense'" in err, err


def test_up_refuses_a_bad_plan(capsys):
    from shared.launcher.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--moe-backend", "2:loop"])
    assert "'2:loop': token counts must start at 1" in capsys.readouterr().err


def test_a_worker_refuses_bad_values_by_flag_and_environment(tiny_fp32, capsys, monkeypatch):
    from services.decode.decode_rank import DecodeService
    from shared.runtime.engine_service import engine_main

    argv = ["--model", str(tiny_fp32), "--redis-url", "redis://127.0.0.1:1/0"]
    with pytest.raises(SystemExit) as e:
        engine_main(DecodeService, [*argv, "--moe-backend", "nonsense"])
    assert e.value.code == 2 and "argument --moe-backend: 'nonsense': expected auto, one of" in capsys.readouterr().err
    monkeypatch.setenv("STREAMOE_MOE_BACKEND", "nonsense")
    with pytest.raises(SystemExit) as e:
        engine_main(DecodeService, argv)
    assert e.value.code == 2
    assert "STREAMOE_MOE_BACKEND='nonsense': not a valid value for --moe-backend" in capsys.readouterr().err
    monkeypatch.setenv("STREAMOE_MOE_BACKEND", "1:loop,16:bmm")
    monkeypatch.setenv("STREAMOE_DTYPE", "nonsense")
    with pytest.raises(SystemExit) as e:
        engine_main(DecodeService, argv)
    assert e.value.code == 2 and "STREAMOE_DTYPE='nonsense': choose from" in capsys.readouterr().err


# --- one deployment, one value ----------------------------------------------------------------

async def test_workers_agree_through_redis(redis, redis_url):
    computed = []

    def compute(value):
        def run():
            computed.append(value)
            return value
        return run

    first = await agree(redis, "abc", "auto", "auto", compute(Numerics("fp32", "1:loop,8:bmm", "measured")))
    second = await agree(redis, "abc", "auto", "auto", compute(Numerics("bf16", "grouped", "measured")))
    assert first == Numerics("fp32", "1:loop,8:bmm", "measured")
    assert second == Numerics("fp32", "1:loop,8:bmm", "cached") and len(computed) == 1  # adopted, not measured
    assert await redis.get(streams.numerics_lock_key("abc")) is None  # released
    # explicit flags that disagree win over the published value, and leave it as it was
    assert (await agree(redis, "abc", "bf16", "auto", compute(Numerics("bf16", "bmm", "measured")))).dtype == "bf16"
    assert json.loads(await redis.get(streams.numerics_key("abc")))["dtype"] == "fp32"


async def test_a_worker_that_loses_the_race_adopts_the_winner(redis, redis_url):
    import redis as sync_redis

    def slow():  # while this worker measures, another publishes first
        sync_redis.Redis.from_url(redis_url).set(streams.numerics_key("raced"),
                                                 Numerics("bf16", "loop", "measured").published())
        return Numerics("fp32", "bmm", "measured")

    assert await agree(redis, "raced", "auto", "auto", slow) == Numerics("bf16", "loop", "cached")


async def test_one_worker_calibrates_while_the_others_wait(redis):
    """Concurrent starts: the lock lets one measure (the others' timings would skew its own)."""
    computed = []

    def compute():
        computed.append(1)
        import time
        time.sleep(0.3)
        return Numerics("fp32", "grouped", "measured")

    results = await asyncio.gather(*[agree(redis, "together", "auto", "auto", compute, poll_s=0.05)
                                     for _ in range(3)])
    assert len(computed) == 1 and sorted(r.source for r in results) == ["cached", "cached", "measured"]
    assert {(r.dtype, r.moe_backend) for r in results} == {("fp32", "grouped")}


async def test_the_cache_service_waits_for_the_published_value(redis):
    closing = asyncio.Event()
    waiter = asyncio.create_task(wait_published(redis, "waited", closing, poll_s=0.05))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await redis.set(streams.numerics_key("waited"), Numerics("bf16", "grouped", "measured").published())
    assert (await asyncio.wait_for(waiter, 5)).dtype == "bf16"
    closing.set()
    assert await wait_published(redis, "never", closing) is None


# --- a handoff in another dtype ---------------------------------------------------------------

async def test_a_handoff_in_another_dtype_is_refused_naming_both(redis):
    from services.decode.decode_rank import CONSUMER_GROUP, DecodeService
    from services.prefill.prefill_rank import NO_KV
    from shared.protocol.messages import KVChunk, Sampling, TokenDelta, TokenizedRequest
    from shared.protocol.tensors import checksum, to_blob
    from shared.runtime.bus import Bus

    decode = DecodeService.__new__(DecodeService)  # the handoff path only: no model is loaded
    decode.engine = SimpleNamespace(model=SimpleNamespace(dtype=torch.float32))  # no add_prefilled: never admitted
    decode.num_kv_layers, decode.redis, decode.bus = 2, redis, Bus(redis, "decode-test")
    decode.log, decode._closing = logging.getLogger("test"), asyncio.Event()
    decode.config = ServiceConfig("redis://unused", "decode-test")
    decode.stream = streams.kv_stream("decode", 0)
    decode.handoffs, decode.ready_to_admit, decode.history, decode.requests, decode.held = {}, [], {}, {}, {}
    decode.aborted, decode.finished = [], []
    await decode.bus.ensure_consumer_group(decode.stream, CONSUMER_GROUP)
    request = TokenizedRequest("req-1", "trace-1", "gw", Sampling(max_tokens=4), 0.0, [1, 2, 3])
    for layer in range(2):
        blob = to_blob(torch.zeros(3, 8, dtype=torch.bfloat16))
        await decode.bus.publish(decode.stream, KVChunk("req-1", "trace-1", layer, 2, blob, checksum(blob.data)))
    await decode.bus.publish(decode.stream, KVChunk("req-1", "trace-1", -1, 2, NO_KV, "", request=request,
                                                    first_token=7, final=True))
    for entry in await decode.bus.read(decode.stream, CONSUMER_GROUP, KVChunk, count=16, block_ms=None):
        decode.receive(entry)
    await decode.admit_ready()
    ((_, fields),) = await redis.xrange(streams.raw_deltas_stream(0))
    from shared.protocol.wire import decode as decode_message

    delta = decode_message(next(iter(fields.values())), TokenDelta)
    assert delta.finish_reason == "error" and delta.status == 500 and delta.index == 1
    assert "KV handoff of request req-1 is bfloat16; this decode rank computes in float32" in delta.error
    assert decode.handoffs == {} and await redis.xlen(decode.stream) == 0  # consumed, not re-prefilled
    assert await redis.xlen(streams.tokenized_stream(0)) == 0 and ("req-1", 0) in decode.finished
