"""A test-sized `streamoe distill-mtp` run (a few seconds of data and of training), shared by the
distillation tests and the speculation tests that need drafts worth accepting."""
from __future__ import annotations

from pathlib import Path

from shared.model.distill import DistillSettings, distill_mtp

QUICK = DistillSettings(steps=300, train_seqs=512, heldout_seqs=64, gen_tokens=64, batch_seqs=8, warmup_steps=20,
                        lr=5e-3)


def distill_quick(source: Path, out: Path, seed: int = 3) -> dict:
    """tiny's MTP layer trained on its own greedy continuations into `out`; the report."""
    return distill_mtp(source, out, seed=seed, settings=QUICK, progress=False, log=lambda _: None)
