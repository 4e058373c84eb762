"""The tensors of a step (nano-vllm's `ModelRunner`): owns the paged latent KV pool, turns a
schedule into one ragged forward, returns the logits of the rows to sample. No policy here."""
from __future__ import annotations

import torch

from ..model.attention import AttentionBatch, choose_absorbed
from ..model.kv_cache import LatentKVPool
from ..model.model import DeepseekV3
from .scheduler import ScheduledSeq
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: DeepseekV3, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        self.device = model.device
        self.pool = LatentKVPool(model.args, num_blocks * block_size, model.dtype, self.device)
        self._offsets = torch.arange(block_size, device=self.device)
        self.overlap = None  # EP: an ep.overlap.Overlap runs each step as two overlapped micro-batches

    def slots(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """[num_tokens] cache slots of the sequence's first `num_tokens` positions."""
        table = torch.tensor(seq.block_table, device=self.device)
        return (table[:, None] * self.block_size + self._offsets).flatten()[:num_tokens]

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq], on_layer=None) -> torch.Tensor:
        """One forward over every scheduled chunk -> logits [sampled rows, V] (fp32), in schedule order."""
        if self.overlap is None:
            ids, positions, batch = self.inputs(scheduled)
            hidden = self.model(ids, positions, batch, self.pool, on_layer)
        else:
            split = _halve(scheduled)
            halves = [self.inputs(part) for part in (scheduled[:split], scheduled[split:])]
            hidden = torch.cat(self.overlap.run(self.model, halves, self.pool, on_layer))
        ends = torch.tensor([item.num_new for item in scheduled], device=self.device).cumsum(0) - 1
        rows = ends[[i for i, item in enumerate(scheduled) if item.sample]]
        return self.model.logits(hidden[rows])

    def idle(self) -> None:
        """EP: a step with nothing scheduled here still joins every exchange of the group."""
        from ..ep.moe import idle_forward
        from ..ep.overlap import empty_inputs

        if self.overlap is None:
            idle_forward(self.model)
        else:
            self.overlap.run(self.model, [empty_inputs(self.device)] * 2, self.pool)

    def inputs(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        """The ragged step's token ids [T], positions [T] and attention metadata."""
        args = self.model.args
        if not scheduled:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return empty, empty, AttentionBatch([], [], [])
        ids, positions, new_slots, context_slots = [], [], [], []
        query_lens, context_lens, absorbed = [], [], []
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_new
            slots = self.slots(seq, end)
            ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end, device=self.device))
            new_slots.append(slots[start:end])
            context_slots.append(slots)
            query_lens.append(item.num_new)
            context_lens.append(end)
            absorbed.append(choose_absorbed(args, item.num_new, end))
        batch = AttentionBatch(query_lens, context_lens, absorbed, torch.cat(new_slots), context_slots)
        batch.group_single_tokens()
        return torch.tensor(ids, device=self.device), torch.cat(positions), batch

    def write_kv(self, seq: Sequence, kv: torch.Tensor, start: int = 0) -> None:
        """Place the latent KV [layers, L, C+R] of the sequence's first L positions (from `start`
        on): a prompt's KV from a prefill worker, or a prefix from the on-disk cache."""
        slots = self.slots(seq, kv.shape[1])[start:]
        self.pool.kv[:, slots] = kv[:, start:].to(self.pool.kv.dtype)

    def read_kv(self, seq: Sequence, num_tokens: int) -> torch.Tensor:
        """Prefill mode: a copy of the first `num_tokens` positions' latent KV [layers, L, C+R]."""
        return self.pool.kv[:, self.slots(seq, num_tokens)].clone()


def _halve(scheduled: list[ScheduledSeq]) -> int:
    """Where to cut the schedule so both micro-batches get about half the tokens."""
    total, running = sum(item.num_new for item in scheduled), 0
    for i, item in enumerate(scheduled):
        if running + item.num_new / 2 >= total / 2:
            return max(i, 1)
        running += item.num_new
    return len(scheduled)
