"""Two-micro-batch overlap (shared/ep/README.md, "Two-micro-batch overlap"): a step's batch is split in two,
and while one micro-batch's dispatch or combine is on the wire, the compute thread computes the
other. Compute stays on the one compute thread; the communication is the event loop's Redis I/O,
so the overlap is real concurrency, visible in the `--trace` timeline.

Each micro-batch runs as a generator over the layers that yields at its communication points:
`start` hands a payload to the group (the exchange begins at once), `wait` asks for the answer.
The scheduler hands the compute thread to the other micro-batch at every stage boundary where
that one can go on (and whenever one must wait for an answer that has not come), so the stages
alternate as in DeepSeek's figures: ATTN-0 (projections), ATTN-1 (core attention, output
projection, gate), then the MoE layer's dispatch goes out while the SHARED expert computes; the
routed experts (MLP) run on what every rank sent, and the combine goes out while the other
micro-batch computes — the decode 5-stage pipeline, and prefill's ATTN/SHARED/MLP alternation.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from pathlib import Path

import torch

from shared.ep.group import EPGroup
from shared.ep.moe import EPMoE
from shared.model.attention import AttentionBatch
from shared.model.model import DeepseekV3

MICRO_BATCHES = 2
Inputs = tuple[torch.Tensor, torch.Tensor, AttentionBatch]  # ids [T], positions [T], attention metadata


class Tracer:
    """Stage timeline of one rank as Chrome trace JSON (chrome://tracing, Perfetto): a compute
    track and a communication track, one event per stage and micro-batch."""

    def __init__(self, path: Path | None, rank: int, role: str):
        self.path, self.rank, self.role = path, rank, role
        self.events: list[dict] = []
        self._lock = threading.Lock()  # comm events end on the event loop's thread
        self._origin = time.perf_counter()

    def add(self, name: str, track: str, start: float, end: float, **args) -> None:
        if self.path is None:
            return
        event = {"name": name, "ph": "X", "pid": f"{self.role} rank {self.rank}", "tid": track,
                 "ts": (start - self._origin) * 1e6, "dur": max(0.0, end - start) * 1e6, "args": args}
        with self._lock:
            self.events.append(event)

    def flush(self) -> None:
        if self.path is None:
            return
        with self._lock:
            body = {"traceEvents": list(self.events), "displayTimeUnit": "ms"}
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(self.path)


def empty_inputs(device: torch.device) -> Inputs:
    empty = torch.empty(0, dtype=torch.long, device=device)
    return empty, empty, AttentionBatch([], [], [])


def stages(model: DeepseekV3, inputs: Inputs, cache, mb: int) -> Generator[tuple, object, torch.Tensor]:
    """One micro-batch through every layer -> its final hidden states [T, D]."""
    ids, positions, batch = inputs
    h = model.model.embed_tokens(ids)  # [T, D]
    cos, sin = model.rotary.cos_sin(positions, h.dtype)
    for i, layer in enumerate(model.main_layers):
        attn = layer.self_attn
        yield ("mark", f"ATTN-0 l{i}")  # MLA's down/up projections, the new KV into the cache
        if ids.numel():
            x = layer.input_layernorm(h)
            q_nope, q_pe = attn.project_q(x, cos, sin)
            kv = attn.project_kv(x, cos, sin)  # [T, C+R]
            if cache is not None:
                cache.store(attn.layer, batch.slot_mapping, kv)
        yield ("layer_done_attention", i)
        yield ("mark", f"ATTN-1 l{i}")  # core attention, output projection, then the gate
        if ids.numel():
            h = h + attn.attend(q_nope, q_pe, kv, batch, cache)
        x = layer.post_attention_layernorm(h)
        mlp = layer.mlp
        if not isinstance(mlp, EPMoE):
            h = h + mlp(x)
            continue
        sends, routing = mlp.prepare(x)
        handle = yield ("start", i, "dispatch", sends)
        yield ("mark", f"SHARED l{i}")
        shared = mlp.shared(x)  # overlaps this micro-batch's own dispatch
        received = yield ("wait", handle)
        yield ("mark", f"MLP l{i}")
        handle = yield ("start", i, "combine", mlp.serve(received, x.dtype))
        returned = yield ("wait", handle)
        yield ("mark", f"COMBINE-SUM l{i}")
        h = h + (mlp.finish(x, routing, returned) + shared)
    return model.model.norm(h)


class Overlap:
    """What a rank's runner needs to step in two overlapped micro-batches."""

    def __init__(self, group: EPGroup, tracer: Tracer):
        self.group, self.tracer = group, tracer
        self.blocked_s = 0.0  # compute thread idle, both micro-batches waiting on the wire (exposed comm)

    @torch.inference_mode()
    def run(self, model: DeepseekV3, inputs: list[Inputs], cache,
            on_layer: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Both micro-batches (either may be empty) -> their final hidden states, in order."""
        gens = [stages(model, inp, cache, m) for m, inp in enumerate(inputs)]
        results: list[torch.Tensor | None] = [None] * len(gens)
        value: list[object] = [None] * len(gens)
        waiting: dict[int, Future] = {}
        progress = [-1] * len(gens)
        stage = ["EMBED"] * len(gens)  # the stage each micro-batch is in (for the trace)
        reported = -1
        turn = 0
        while any(r is None for r in results):
            live = [m for m in range(len(gens)) if results[m] is None]
            runnable = [m for m in live if m not in waiting or waiting[m].done()]
            if not runnable:
                blocked = time.perf_counter()
                wait_futures([waiting[m] for m in live], return_when=FIRST_COMPLETED)
                self.blocked_s += time.perf_counter() - blocked
                continue
            m = min(runnable, key=lambda k: (k - turn) % len(gens))  # take turns
            turn = m + 1
            if m in waiting:
                value[m] = waiting.pop(m).result()
            label, start = stage[m], time.perf_counter()
            try:
                while True:
                    request = gens[m].send(value[m])
                    value[m] = None
                    kind = request[0]
                    if kind == "mark":
                        now = time.perf_counter()
                        self.tracer.add(f"{label} mb{m}", "compute", start, now, mb=m)
                        label, start = request[1], now
                        stage[m] = label
                        if any(k != m and (k not in waiting or waiting[k].done()) for k in live):
                            label = None  # a stage boundary: the other micro-batch takes its turn
                            break
                    elif kind == "layer_done_attention":
                        progress[m] = request[1]
                    elif kind == "start":
                        value[m] = self.start(m, *request[1:])
                    elif kind == "wait":
                        if not request[1].done():
                            waiting[m] = request[1]
                            break
                        value[m] = request[1].result()
            except StopIteration as done:
                results[m] = done.value
                progress[m] = model.args.num_hidden_layers
            if label is not None:
                self.tracer.add(f"{label} mb{m}", "compute", start, time.perf_counter(), mb=m)
            floor = min(progress)
            if on_layer is not None:
                for layer in range(reported + 1, min(floor + 1, model.args.num_hidden_layers)):
                    on_layer(layer)
            reported = max(reported, floor)
        return results

    def start(self, mb: int, layer: int, phase: str, sends: list[bytes]) -> Future:
        started = time.perf_counter()
        future = self.group.start_exchange(f"l{layer}:mb{mb}:{phase}", sends)
        name = f"{phase.upper()} l{layer} mb{mb}"
        future.add_done_callback(lambda _: self.tracer.add(name, "communication", started, time.perf_counter(),
                                                           mb=mb, bytes=sum(len(p) for p in sends)))
        return future
