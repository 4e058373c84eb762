"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

NOTE: a seeded request draws its k-th token from a generator seeded by (seed, k) alone, so its
tokens do not depend on what else is in the batch, nor on a preemption that recomputes it.
"""
from __future__ import annotations

import hashlib

import torch

from shared.engine.sequence import SamplingParams


def token_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Sampler:
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                 indices: list[int]) -> list[int]:
        """logits [N, V] fp32; per row its params, its request's seed and the index of the token
        being drawn -> N token ids."""
        tokens = logits.argmax(dim=-1).tolist()  # greedy rows keep these
        for row, p in enumerate(params):
            if p.temperature > 0:
                tokens[row] = self._draw(logits[row], p, token_seed(seeds[row], indices[row]))
        return tokens

    @staticmethod
    def _draw(logits: torch.Tensor, p: SamplingParams, seed: int) -> int:
        probs = Sampler.probs(logits, p)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # exponential race: argmax(p / E) with E ~ Exp(1) draws from p; noise on the CPU generator
        noise = torch.empty(probs.shape, dtype=torch.float32).exponential_(generator=gen).to(probs.device)
        return int((probs / noise).argmax())

    @staticmethod
    def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        """The distribution a sampled row draws from [V]: temperature, then top-k, then top-p."""
        logits = logits.float() / p.temperature  # [V]
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = logits.topk(p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            probs = sorted_logits.softmax(-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = probs.cumsum(-1) - probs >= p.top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        return logits.softmax(-1)
