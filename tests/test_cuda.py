"""CUDA readiness (issue #15): from a step's input tensors on the device to the sampled ids on the
device, the forward issues no host synchronisation (bf16, EP size 1, the grouped MoE backend). The
inputs are built on the host in pinned memory and copied without blocking, outside the region;
the one copy of the sampled ids to the host lies outside it too. Run with `pytest -m cuda`; it
skips without a CUDA device."""
from __future__ import annotations

import pytest
import torch

from shared.engine.engine import Engine, EngineConfig
from shared.engine.sequence import SamplingParams
from shared.model.kv_cache import to_device
from shared.model.loader import load_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")]


def region(engine: Engine) -> torch.Tensor:
    """Schedule the next step, build its inputs, then run the forward and greedy sampling with any
    host synchronisation raising; -> the sampled ids, still on the device."""
    scheduled = engine.scheduler.schedule()
    runner = engine.runner
    ids, positions, batch = runner.inputs(scheduled)
    ends, rows = 0, []
    for item in scheduled:
        ends += item.num_new
        if item.sample:
            rows.append(ends - 1)
    rows = to_device(torch.tensor(rows), runner.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hidden = engine.model(ids, positions, batch, runner.pool)
        sampled = engine.model.logits(hidden.index_select(0, rows)).argmax(dim=-1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sampled


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_step_from_device_inputs_to_sampled_ids_never_syncs(tiny_fp32, phase):
    model = load_model(tiny_fp32, dtype="bf16", device="cuda", moe_backend="grouped")
    engine = Engine(model, EngineConfig(kv_cache_bytes=16 << 20))
    gen = torch.Generator().manual_seed(0)
    for i, n in enumerate((5, 40, 70, 130)):
        engine.add_request(str(i), torch.randint(3, 1024, (n,), generator=gen).tolist(),
                           SamplingParams(max_tokens=8, ignore_eos=True))
    if phase == "decode":
        engine.step()  # the prompts (and a first warm-up of every kernel)
        engine.step()
    else:
        warm = Engine(model, EngineConfig(kv_cache_bytes=4 << 20))  # kernels and device tables warmed up
        warm.add_request("w", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
        while warm.has_unfinished():
            warm.step()
    sampled = region(engine)
    assert sampled.device.type == "cuda" and sampled.shape == (4,)
    assert all(0 <= t < 1024 for t in sampled.tolist())


def test_grouped_gives_the_loop_backends_tokens_on_cuda(tiny_fp32):
    """The grouped op on the GPU against one expert at a time, on the same bf16 model: greedy tokens
    agree (within bf16, up to the first near-tie of either)."""
    model = load_model(tiny_fp32, dtype="bf16", device="cuda", moe_backend="grouped")
    prompt = list(range(3, 60))
    outputs = {}
    for backend in ("grouped", "loop"):
        model.set_moe_backend(backend)
        engine = Engine(model, EngineConfig(kv_cache_bytes=4 << 20))
        engine.add_request("r", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
        tokens = []
        while engine.has_unfinished():
            for delta in engine.step():
                tokens += delta.token_ids
        outputs[backend] = tokens
    assert outputs["grouped"][0] == outputs["loop"][0]
