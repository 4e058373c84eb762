"""A test-sized `streamoe distill-mtp` run (a few seconds of data and of training), shared by the
distillation tests and the speculation tests that need drafts worth accepting."""
from __future__ import annotations

from pathlib import Path

import torch

from shared.model import distill
from shared.model.distill import DistillSettings, distill_mtp

QUICK = DistillSettings(steps=300, train_seqs=512, heldout_seqs=64, gen_tokens=64, batch_seqs=8, warmup_steps=20,
                        lr=5e-3)


def distill_quick(source: Path, out: Path, seed: int = 3) -> dict:
    """tiny's MTP layer trained on its own greedy continuations into `out`; the report."""
    return distill_mtp(source, out, seed=seed, settings=QUICK, progress=False, log=lambda _: None)


def trained_prompts(count: int, prefix_seed: int, tail: list[int], vocab: int = 1024) -> list[list[int]]:
    """`count` prompts drawn as the quick distillation (seed 3) drew its training prompts, so its
    layer accepts a few percent of the drafts there (about as many as on new prompts: enough over a
    few hundred drafts to be sure the accept path runs), then a 130-token random prefix + `tail`:
    a prompt whose prefix another test request (or a restart) may find in the cache."""
    gen = torch.Generator().manual_seed(3)
    prompts = [distill._random_prompt(gen, vocab, QUICK.prompt_len) for _ in range(count)]
    prefix = torch.randint(3, vocab, (130,), generator=torch.Generator().manual_seed(prefix_seed)).tolist()
    return prompts + [prefix + tail]
