"""The tensors of a step (nano-vllm's `ModelRunner`): owns the paged latent KV pool, turns a
schedule into one ragged forward, returns the logits of the rows to sample. No policy here.

A step's index tensors are built on the host from Python ints without a loop over sequences'
tensors, then copied to the device without waiting (pinned memory on CUDA), so the forward never
synchronises. Legend: S = scheduled sequences, T = new tokens of the step, W = positions covered by
the longest context's blocks."""
from __future__ import annotations

from itertools import accumulate

import torch

from shared.engine.scheduler import ScheduledSeq
from shared.engine.sequence import Sequence
from shared.model.attention import AttentionBatch, choose_absorbed
from shared.model.kv_cache import LatentKVPool, plan_reads, to_device
from shared.model.model import DeepseekV3


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
    def run(self, scheduled: list[ScheduledSeq], on_layer=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over every scheduled chunk -> (logits [sampled rows, V] (fp32), the final hidden
        states [T, D]), in schedule order. A sampled chunk's rows: its last, and one per draft before it."""
        # the sampled rows, on their way to the device before the forward starts
        ends = accumulate(item.num_new for item in scheduled)
        rows = torch.tensor([row for end, item in zip(ends, scheduled) if item.sample
                             for row in range(end - 1 - len(item.draft), end)], dtype=torch.long)
        rows = to_device(rows, self.device)
        if self.overlap is None:
            ids, positions, batch = self.inputs(scheduled)
            hidden = self.model(ids, positions, batch, self.pool, on_layer)
        else:
            split = _halve(scheduled)
            halves = [self.inputs(part) for part in (scheduled[:split], scheduled[split:])]
            hidden = torch.cat(self.overlap.run(self.model, halves, self.pool, on_layer))
        return self.model.logits(hidden.index_select(0, rows)), hidden

    @torch.inference_mode()
    def run_mtp(self, entries: list[tuple[Sequence, int, list[int]]], hidden: torch.Tensor) -> torch.Tensor:
        """The MTP layer over `entries` (sequence, first position, the tokens one past each position)
        with the hidden states [T, D] of those positions -> its outputs [T, D]; its KV goes to the pool."""
        ids, positions, batch = self._inputs(entries)
        return self.model.draft(ids, hidden, positions, batch, self.pool)

    def idle(self) -> None:
        """EP: a step with nothing scheduled here still joins every exchange of the group."""
        from shared.ep.moe import idle_forward
        from shared.ep.overlap import empty_inputs

        if self.overlap is None:
            idle_forward(self.model)
        else:
            self.overlap.run(self.model, [empty_inputs(self.device)] * 2, self.pool)

    def inputs(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch]:
        """The ragged step's token ids [T], positions [T] and attention metadata (with its read plan)."""
        entries = []
        for item in scheduled:
            start = item.seq.num_computed
            tokens = item.seq.token_ids[start:start + item.num_new]
            entries.append((item.seq, start, tokens + item.draft if item.draft else tokens))
        return self._inputs(entries)

    def _inputs(self, entries: list[tuple[Sequence, int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                AttentionBatch]:
        """(sequence, first position, token ids from there) each -> ids [T], positions [T], metadata."""
        args = self.model.args
        if not entries:
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return empty, empty, AttentionBatch([], [], [])
        starts = [start for _, start, _ in entries]
        query_lens = [len(tokens) for _, _, tokens in entries]
        context_lens = [start + n for start, n in zip(starts, query_lens)]
        absorbed = [choose_absorbed(args, n, end) for n, end in zip(query_lens, context_lens)]
        ids = [t for _, _, tokens in entries for t in tokens]
        width = -(-max(context_lens) // self.block_size)  # blocks that hold the longest context
        tables = [seq.block_table[:width] for seq, _, _ in entries]
        blocks = torch.tensor([table + [0] * (width - len(table)) for table in tables])  # [S, W / block]
        slot_table = (blocks[:, :, None] * self.block_size + torch.arange(self.block_size)).flatten(1)  # [S, W]
        lens = torch.tensor(query_lens)
        seq_of = torch.repeat_interleave(torch.arange(len(entries)), lens)  # [T]
        first = torch.tensor(starts) - (lens.cumsum(0) - lens)  # [S] position minus step row, per sequence
        positions = torch.arange(len(ids)) + first[seq_of]  # [T]
        plan = plan_reads(query_lens, context_lens, absorbed, slot_table)
        slot_mapping = to_device(slot_table[seq_of, positions], self.device)
        batch = AttentionBatch(query_lens, context_lens, absorbed, slot_mapping, plan=plan.to(self.device))
        return to_device(torch.tensor(ids, dtype=torch.long), self.device), to_device(positions, self.device), batch

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
