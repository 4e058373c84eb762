"""Who runs this step (nano-vllm's `Scheduler`). Pure policy: no tensors.

Every sequence is in one state: `num_computed` of its tokens have KV in the cache; a step
computes the next chunk of the rest and, when the chunk reaches its last token, samples one more.
A decode is simply a sequence with one uncomputed token, a prefill one with many, a preempted
sequence one with none computed: the same rule recomputes it exactly.

Modes:
- mixed: decodes first, then chunked prefills under the token budget (`streamoe generate`, tests);
- prefill: prompts only; a sequence is done once its first token is sampled (prefill workers);
- decode: sequences arrive with their prompt's KV (`admit_prefilled`) and reserve blocks for
  prompt + max_tokens at admission, so they never wait for memory (decode workers).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shared.engine.block_manager import BlockManager
from shared.engine.sequence import Sequence, Status

MODES = ("mixed", "prefill", "decode")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed this step, from seq.num_computed on (drafts included)
    sample: bool  # the chunk reaches the sequence's last token: sample the next one
    draft: list[int] = field(default_factory=list)  # speculative tokens after the last one, to verify


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 mode: str = "mixed"):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs}, max_num_batched_tokens={max_num_batched_tokens}: "
                             "both must be >= 1")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.mode = mode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        # a model whose MTP layer keeps its KV: the row at a cached prefix's last position was computed
        # with whatever token followed it then, so that position is computed again (engine.py)
        self.recompute_prefix_end = False

    def add(self, seq: Sequence) -> None:
        if self.mode == "decode":
            raise RuntimeError("a decode-mode scheduler takes sequences through admit_prefilled")
        self.waiting.append(seq)

    def can_admit_prefilled(self, seq: Sequence) -> bool:
        return len(self.running) < self.max_num_seqs and self.blocks.can_admit(seq, seq.max_length)

    def admit_prefilled(self, seq: Sequence) -> None:
        """Decode mode: reserve blocks for prompt + max_tokens; the caller writes the prompt's KV."""
        self.blocks.admit(seq, seq.max_length)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.blocks.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        # 1. decodes, oldest first; when memory runs out the newest sequence is preempted
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.num_uncomputed != 1 or seq.num_computed < len(seq.prompt_ids):
                continue
            if budget == 0:
                break
            if not self._make_room(seq, seq.num_tokens):
                continue  # seq itself was the newest: preempted
            draft = seq.draft_ids[:budget - 1] if seq.pending_finish is None else []
            while draft and self.blocks.blocks_needed(seq, seq.num_tokens + len(draft)) > self.blocks.num_free:
                draft.pop()  # drafts never preempt anyone
            self.blocks.grow(seq, seq.num_tokens + len(draft))
            # verify the drafts in the same forward; no sampling past the end
            scheduled.append(ScheduledSeq(seq, 1 + len(draft), seq.pending_finish is None, draft))
            seq.draft_ids = []
            budget -= 1 + len(draft)
        # 2. prefills already running (the next chunk)
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed > 1 or (seq.num_uncomputed == 1 and seq.num_computed < len(seq.prompt_ids)):
                if not any(s.seq is seq for s in scheduled):
                    scheduled.append(self._chunk(seq, budget))
                    budget -= scheduled[-1].num_new
        # 3. admit waiting sequences while their whole token span fits
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_admit(seq, seq.num_tokens):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, seq.num_tokens)
            if self.recompute_prefix_end and seq.external_kv is not None and seq.external_from < seq.num_computed:
                seq.num_computed -= 1  # an external prefix (the on-disk cache) lies in blocks of its own
            seq.mtp_computed = seq.num_computed  # a prefix shared in memory keeps its MTP rows as they are
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(self._chunk(seq, budget))
            budget -= scheduled[-1].num_new
        return scheduled

    def _chunk(self, seq: Sequence, budget: int) -> ScheduledSeq:
        n = min(seq.num_uncomputed, budget)
        return ScheduledSeq(seq, n, n == seq.num_uncomputed)

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Free blocks for seq's first `num_tokens` by preempting the newest running sequences."""
        while self.blocks.blocks_needed(seq, num_tokens) > self.blocks.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Drop the sequence's KV; it goes back to the head of the queue to be recomputed."""
        self.blocks.release(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        seq.num_cached_prompt = 0
        seq.draft_ids, seq.mtp_computed, seq.mtp_hidden = [], 0, None
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
