"""Drive our model the way the engine does, for comparisons against the reference."""
from __future__ import annotations

import torch

from shared.model.attention import AttentionBatch
from shared.model.kv_cache import LatentKVPool


def packed_logits(model, prompts: list[list[int]], absorbed: bool = False) -> list[torch.Tensor]:
    """All prompts in one ragged step without a cache -> per prompt logits [len, V]."""
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    hidden = model(ids, positions, AttentionBatch.prefill([len(p) for p in prompts], absorbed=absorbed))
    return list(model.logits(hidden).split([len(p) for p in prompts]))


def incremental_logits(model, prompts: list[list[int]], continuations: list[list[int]],
                       prefill_absorbed: bool = False) -> list[torch.Tensor]:
    """Prefill every prompt in one step through a latent cache, then feed each continuation one
    token per step (all sequences in the same step, absorbed path) -> per sequence the logits of
    the last prompt position and of every fed token [1 + len(cont), V]."""
    args = model.args
    span = max(len(p) + len(c) for p, c in zip(prompts, continuations))
    pool = LatentKVPool(args, span * len(prompts), model.dtype)
    slots = [torch.arange(i * span, (i + 1) * span) for i in range(len(prompts))]
    lens = [len(p) for p in prompts]
    batch = AttentionBatch(lens, lens, [prefill_absorbed] * len(prompts),
                           slot_mapping=torch.cat([s[:n] for s, n in zip(slots, lens)]),
                           context_slots=[s[:n] for s, n in zip(slots, lens)])
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    hidden = model(ids, positions, batch, pool)
    ends = torch.tensor(lens).cumsum(0) - 1
    out = [[row] for row in model.logits(hidden[ends])]
    for step in range(max(len(c) for c in continuations)):
        live = [i for i, c in enumerate(continuations) if step < len(c)]
        pos = [lens[i] + step for i in live]
        batch = AttentionBatch([1] * len(live), [p + 1 for p in pos], [True] * len(live),
                               slot_mapping=torch.stack([slots[i][p] for i, p in zip(live, pos)]),
                               context_slots=[slots[i][:p + 1] for i, p in zip(live, pos)])  # chunked decode
        ids = torch.tensor([continuations[i][step] for i in live])
        logits = model.logits(model(ids, torch.tensor(pos), batch, pool))
        for i, row in zip(live, logits):
            out[i].append(row)
    return [torch.stack(rows) for rows in out]
