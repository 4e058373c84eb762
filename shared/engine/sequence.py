"""Per-request state of the engine (nano-vllm's `Sequence`): tokens, progress, blocks, sampling."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from shared.cache.hashing import BLOCK_SIZE


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its KV was dropped and will be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler. Validated by `validate`, which names the bad field."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0  # in (0, 1]
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # the output index of this request's first token: a request resumed after its decode rank died
    # goes on at the index it stopped at, so a seeded one draws the same tokens it would have
    first_index: int = 0

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be an integer >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r}: must be -1, 0 (off) or a positive integer")


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order; the newest is preempted first
    root_hash: bytes = b""  # parent of the first block's hash (model fingerprint + cache_salt)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_prompt: int = 0  # prompt tokens whose KV came from shared blocks (not computed here)
    # A prefix's KV from outside the engine (the on-disk prefix cache): [layers, N, C+R], N whole
    # blocks; written into the pool at admission, dropped once the prompt is computed.
    external_kv: Any = None
    external_from: int = 0  # at admission: where the external KV starts to be needed (after in-memory hits)
    # Finished, but its last token's KV is computed in one more step first (for the prefix cache)
    pending_finish: str | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    # Speculative decoding (engine.py): the MTP layer's drafts for the next step, how many leading
    # positions have MTP KV computed from the main model's hidden states, and the main model's
    # hidden states [k, D] of the positions after those that are computed but not yet extended
    # (e.g. a prompt's last position, handed over by a prefill worker).
    draft_ids: list[int] = field(default_factory=list)
    mtp_computed: int = 0
    mtp_hidden: Any = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        """True until the prompt (and any output to recompute after a preemption) is in the cache."""
        return self.num_uncomputed > 1 or self.num_computed < len(self.prompt_ids)

    @property
    def max_length(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @staticmethod
    def blocks_for(num_tokens: int) -> int:
        return -(-num_tokens // BLOCK_SIZE)
