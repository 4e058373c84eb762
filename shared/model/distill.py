"""`streamoe distill-mtp`: train a checkpoint's MTP layer on the model's own greedy continuations.

Everything but the MTP layer stays frozen. The data: random token-id prompts (BOS, then ids past
the special tokens, of random length), their greedy continuations by the engine (batched,
ignore_eos), then the main model's final hidden states h_i of each whole sequence from one no-grad
forward. At position i the MTP layer reads h_i and token i+1 and predicts token i+2; it is trained
on the positions whose token i+2 was generated (never a random prompt token), attending causally
over the whole sequence, the prompt included, as it does when it drafts (shared/engine/engine.py).

The objective, per trained position: cross-entropy against token i+2, plus a distillation term,
the cross-entropy against the main model's own next-token distribution there, softmax(lm_head(h_{i+1}))
(whose argmax *is* token i+2: the continuations are greedy), plus a mean squared error between the
layer's output and h_{i+1} (a dense signal; the output is also the `hidden` of a further draft). The
logits go through the frozen shared head a chunk of rows at a time, so the [rows, vocab] logits never
exist whole. AdamW, a linear warm-up and a cosine decay, gradient clipping; deterministic for a
seed (fixed data, torch.manual_seed).

Trained: enorm, hnorm, eh_proj, the decoder layer (MLA, the gate's weight, the routed experts'
stack, the shared experts, both norms) and shared_head.norm. Frozen: embed_tokens and
shared_head.head (copies of the main model's) and the routing bias (a load-balancing statistic,
not a gradient-trained weight). The routed experts run through the `grouped` backend (`bmm` where
torch has no grouped matmul), both differentiable in the stack's w13/w2 (the `loop` backend calls
the per-expert modules, whose weights are detached views of the stack: gradients would not reach it).

The layer is written back under its tensor names in the checkpoint's dtypes (FP8 re-quantized
where the source stored a tensor as FP8 with a `_scale_inv`); every other tensor keeps its bytes.
In place: a new file, then an atomic rename (sharded checkpoints: new shards, then the index
replaced atomically, then the shards it no longer names removed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from shared.model.attention import AttentionBatch
from shared.model.config import ModelArgs
from shared.model.experts import ExpertStack, MoEPlan, check_supported
from shared.model.fp8 import quantize_blockwise
from shared.model.moe import MoE
from shared.model.tokenizer_files import BOS_ID, SPECIAL_TOKENS

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FROZEN = ("embed_tokens.weight", "shared_head.head.weight", "mlp.gate.e_score_correction_bias")


class NoMTPLayerError(ValueError):
    """The checkpoint has no MTP layer to train."""


@dataclass(frozen=True)
class DistillSettings:
    """What `distill_mtp` trains on and how; `for_model` picks the defaults of `streamoe distill-mtp`."""

    steps: int = 3000
    train_seqs: int = 4096  # generated training sequences
    heldout_seqs: int = 128  # generated held-out sequences (never trained on)
    prompt_len: tuple[int, int] = (8, 24)  # random prompt length range, BOS included (inclusive)
    gen_tokens: int = 96  # greedy tokens generated after each prompt
    batch_seqs: int = 16  # sequences per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * this
    warmup_steps: int = 50
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    distill_weight: float = 1.0  # weight of the soft cross-entropy against the main model's distribution
    hidden_weight: float = 10.0  # weight of the mean squared error between the output and h_{i+1} (per channel)
    chunk_rows: int = 1024  # logits rows computed at a time
    gen_batch: int = 128  # sequences the engine decodes together

    @classmethod
    def for_model(cls, args: ModelArgs) -> DistillSettings:
        """The defaults by model size, sized for a 2-core CPU: up to tiny's hidden size (<= 256) 3000
        steps on 4096 sequences (~4 min for tiny); above it 1500 steps on 1024 sequences (~45 min for
        small, whose steps cost ~20x tiny's). Larger models want --steps chosen for their hardware."""
        if args.hidden_size <= 256:
            return cls()
        return cls(steps=1500, train_seqs=1024)


def distill_mtp(model_dir: str | Path, out_dir: str | Path | None = None, steps: int | None = None, seed: int = 0,
                log: Callable[[str], None] = print, progress: bool = True,
                settings: DistillSettings | None = None) -> dict:
    """Train the MTP layer of the checkpoint in `model_dir`; write it to `out_dir` (a new checkpoint
    directory), or back into `model_dir` when None. Returns the held-out figures:
    acceptance (position 1, trained), untrained, repeat_last (baseline), positions, seconds, ..."""
    from shared.model.loader import load_model

    started = time.monotonic()
    model_dir = Path(model_dir)
    args = ModelArgs.from_file(model_dir / "config.json")
    if not args.num_mtp_layers:
        raise NoMTPLayerError(f"{model_dir}: the checkpoint has no MTP layer (num_nextn_predict_layers is 0 in its "
                              "config.json); write one with `streamoe init-model --mtp`")
    settings = settings or DistillSettings.for_model(args)
    if steps is not None:
        settings = replace(settings, steps=steps)
    if settings.steps < 0:
        raise ValueError(f"steps={settings.steps}: must be >= 0")
    out_dir = None if out_dir is None else Path(out_dir)
    if out_dir is not None and out_dir.resolve() == model_dir.resolve():
        out_dir = None
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"--out {out_dir}: exists and is not empty")

    torch.manual_seed(seed)
    model = load_model(model_dir, dtype="fp32")  # trained in fp32, whatever the checkpoint's dtype
    gen = torch.Generator().manual_seed(seed)
    log(f"distill-mtp: generating {settings.train_seqs} + {settings.heldout_seqs} greedy continuations "
        f"of {settings.gen_tokens} tokens")
    prompts = [_random_prompt(gen, args.vocab_size, settings.prompt_len)
               for _ in range(settings.train_seqs + settings.heldout_seqs)]
    seqs = _continue_greedy(model, prompts, settings.gen_tokens, settings.gen_batch)
    hidden = _hidden_states(model, [s for s, _ in seqs])
    data = [_Example.of(tokens, prompt_len, h) for (tokens, prompt_len), h in zip(seqs, hidden)]
    train, heldout = data[:settings.train_seqs], data[settings.train_seqs:]

    mtp = model.mtp
    params = _make_trainable(mtp)
    untrained = evaluate(model, heldout, settings.chunk_rows)
    log(f"distill-mtp: untrained layer: held-out acceptance {untrained['acceptance']:.3f} (position 1)")
    losses = _train(model, params, train, settings, gen, progress)
    trained = evaluate(model, heldout, settings.chunk_rows)

    written = _write_layer(model, model_dir, out_dir)
    seconds = time.monotonic() - started
    result = {"acceptance": trained["acceptance"], "untrained": untrained["acceptance"],
              "repeat_last": trained["repeat_last"], "positions": trained["positions"],
              "train_positions": sum(e.num_trained for e in train), "steps": settings.steps,
              "final_loss": losses[-1] if losses else None, "seconds": seconds, "written": [str(p) for p in written]}
    log(f"distill-mtp: held-out acceptance {result['acceptance']:.2f} (position 1; {result['acceptance']:.4f}), "
        f"untrained layer {result['untrained']:.4f}, repeat-last-token baseline {result['repeat_last']:.4f}, "
        f"{result['positions']} positions of {len(heldout)} held-out sequences; {settings.steps} steps, "
        f"{seconds:.0f} s; wrote {', '.join(p.name for p in written)} to {written[0].parent}")
    return result


# -- data -----------------------------------------------------------------------------------------

@dataclass
class _Example:
    """One generated sequence, as the MTP layer sees it: at position i (0 <= i < n-2) token i+1 and
    h_i in, token i+2 out; `teacher` h_{i+1} (whose logits the main model drew token i+2 from)."""

    next_ids: torch.Tensor  # [n-2]
    hidden: torch.Tensor  # [n-2, D]
    teacher: torch.Tensor  # [n-2, D]
    targets: torch.Tensor  # [n-2]
    trained: torch.Tensor  # [n-2] bool: token i+2 was generated
    num_trained: int

    @classmethod
    def of(cls, tokens: list[int], prompt_len: int, h: torch.Tensor) -> _Example:
        ids = torch.tensor(tokens)
        n = len(tokens)
        trained = torch.arange(2, n) >= prompt_len
        return cls(ids[1:n - 1], h[:n - 2], h[1:n - 1], ids[2:], trained, int(trained.sum()))


def _random_prompt(gen: torch.Generator, vocab: int, lengths: tuple[int, int]) -> list[int]:
    n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
    return [BOS_ID, *torch.randint(len(SPECIAL_TOKENS), vocab, (n - 1,), generator=gen).tolist()]


def _continue_greedy(model, prompts: list[list[int]], gen_tokens: int,
                     batch: int) -> list[tuple[list[int], int]]:
    """Each prompt and its greedy continuation -> (tokens, prompt length), in prompt order."""
    from shared.cache.hashing import BLOCK_SIZE
    from shared.engine.engine import Engine, EngineConfig
    from shared.engine.sequence import SamplingParams
    from shared.model.kv_cache import LatentKVPool

    longest = max(len(p) for p in prompts) + gen_tokens
    blocks = batch * -(-longest // BLOCK_SIZE) + 1
    kv_bytes = blocks * BLOCK_SIZE * LatentKVPool.bytes_per_token(model.args, model.dtype)
    engine = Engine(model, EngineConfig(kv_cache_bytes=kv_bytes, max_num_seqs=batch,
                                        max_num_batched_tokens=max(2048, longest)))
    params = SamplingParams(max_tokens=gen_tokens, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
        outputs[str(i)] = []
    while engine.has_unfinished():
        for delta in engine.step():
            outputs[delta.request_id].extend(delta.token_ids)
    return [(prompt + outputs[str(i)], len(prompt)) for i, prompt in enumerate(prompts)]


def _hidden_states(model, sequences: list[list[int]], max_tokens: int = 8192) -> list[torch.Tensor]:
    """The main model's final hidden states [n, D] of each whole sequence (no cache, causal)."""
    out: list[torch.Tensor] = []
    group: list[list[int]] = []

    def flush() -> None:
        lens = [len(s) for s in group]
        ids = torch.tensor([t for s in group for t in s], device=model.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(model.device)
        with torch.inference_mode():
            h = model(ids, positions, AttentionBatch.prefill(lens, device=model.device))
        h = h.clone()  # outside inference mode: a tensor autograd may save
        out.extend(h.split(lens))
        group.clear()

    for s in sequences:
        if group and sum(len(g) for g in group) + len(s) > max_tokens:
            flush()
        group.append(s)
    if group:
        flush()
    return out


# -- training -------------------------------------------------------------------------------------

def _make_trainable(mtp: nn.Module) -> list[nn.Parameter]:
    """Fresh, writable fp32 copies of the layer's trained parameters (the loader's may be read-only
    views of the mapped file), the routed experts' stack as two leaf tensors; -> the parameters."""
    _own_expert_load(mtp)
    params: list[nn.Parameter] = []
    for name, p in list(mtp.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        if name.endswith(FROZEN) or ".experts." in f".{name}":
            continue
        trainable = nn.Parameter(p.detach().clone(), requires_grad=True)
        mtp.get_submodule(module_name)._parameters[leaf] = trainable
        params.append(trainable)
    for module in mtp.modules():
        if isinstance(module, MoE):
            if module.stack is None:
                module.stack_experts()
            w13 = nn.Parameter(module.stack.w13.detach().clone(), requires_grad=True)
            w2 = nn.Parameter(module.stack.w2.detach().clone(), requires_grad=True)
            module.use_stack(ExpertStack(w13, w2))  # the per-expert modules now view the trained stack
            module.plan = _train_plan(w13.device)
            params += [w13, w2]
    for name in FROZEN:
        for p_name, p in mtp.named_parameters():
            if p_name.endswith(name):
                p.requires_grad_(False)
    return params


def _own_expert_load(mtp: nn.Module) -> None:
    """The MoE's load counter, if the engine made it under inference mode (drafting), as a normal tensor:
    the forward adds to it in place, which an inference tensor refuses outside inference mode."""
    for module in mtp.modules():
        if isinstance(module, MoE) and module.expert_load is not None and module.expert_load.is_inference():
            module.expert_load = module.expert_load.clone()


def _train_plan(device: torch.device) -> MoEPlan:
    """grouped where torch has it on this device (no padding), else bmm (differentiable too, but pads
    every expert to the busiest one's pairs, which grows as training skews the routing)."""
    try:
        plan = MoEPlan.single("grouped")
        check_supported(plan, device, torch.float32)
        return plan
    except ValueError:
        return MoEPlan.single("bmm")


def _pack(model, examples: list[_Example]):
    """Examples -> the MTP layer's packed inputs and the trained rows' targets."""
    lens = [e.next_ids.shape[0] for e in examples]
    device = model.device
    next_ids = torch.cat([e.next_ids for e in examples]).to(device)
    hidden = torch.cat([e.hidden for e in examples]).to(device)
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    rows = torch.cat([e.trained for e in examples]).nonzero().squeeze(1).to(device)
    targets = torch.cat([e.targets for e in examples]).to(device).index_select(0, rows)
    teacher = torch.cat([e.teacher for e in examples]).to(device).index_select(0, rows)
    cos, sin = model.rotary.cos_sin(positions, hidden.dtype)
    return next_ids, hidden, cos, sin, AttentionBatch.prefill(lens, device=device), rows, targets, teacher


def _train(model, params: list[nn.Parameter], train: list[_Example], settings: DistillSettings,
           gen: torch.Generator, progress: bool) -> list[float]:
    from tqdm import tqdm

    mtp, head, lm_head = model.mtp, model.mtp.shared_head.head, model.lm_head
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return settings.lr * (step + 1) / settings.warmup_steps
        progress_ = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        floor = settings.min_lr_ratio
        return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_))))

    order: list[int] = []
    losses: list[float] = []
    mtp.train()
    bar = tqdm(range(settings.steps), desc="distill-mtp", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = []
        while len(batch) < settings.batch_seqs:
            if not order:
                order = torch.randperm(len(train), generator=gen).tolist()
            batch.append(train[order.pop()])
        next_ids, hidden, cos, sin, attn, rows, targets, teacher = _pack(model, batch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        out = mtp(next_ids, hidden, cos, sin, attn, None).index_select(0, rows)  # [N, D]
        loss = _chunked_loss_backward(out, targets, teacher, head, lm_head, settings)
        torch.nn.utils.clip_grad_norm_(params, settings.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if step % 10 == 0 or step == settings.steps - 1:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_at(step):.1e}")
    bar.close()
    mtp.eval()
    return losses


def _chunked_loss_backward(out: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor, head: nn.Linear,
                           lm_head: nn.Linear, settings: DistillSettings) -> float:
    """The loss of rows `out` [N, D], a chunk of rows of logits at a time: each chunk's loss is
    back-propagated to a detached copy of `out`, whose gradient then goes through the layer once."""
    rows = out.shape[0]
    detached = out.detach().requires_grad_(True)
    total = 0.0
    for start in range(0, rows, settings.chunk_rows):
        chunk = slice(start, start + settings.chunk_rows)
        logits = head(detached[chunk]).float()  # [c, V]
        loss = F.cross_entropy(logits, targets[chunk], reduction="sum")
        if settings.distill_weight:
            with torch.no_grad():
                soft = lm_head(teacher[chunk]).float().softmax(-1)
            loss = loss + settings.distill_weight * F.cross_entropy(logits, soft, reduction="sum")
        if settings.hidden_weight:
            loss = loss + settings.hidden_weight * (detached[chunk] - teacher[chunk]).pow(2).mean(-1).sum()
        (loss / rows).backward()
        total += float(loss.detach())
    out.backward(detached.grad)
    return total / max(1, rows)


@torch.no_grad()
def evaluate(model, examples: list[_Example], chunk_rows: int = 1024, batch_seqs: int = 32) -> dict:
    """Position-1 acceptance over the examples' trained positions: how often the argmax of the MTP
    layer's logits is token i+2; and the repeat-the-last-token baseline (token i+1 as the guess)."""
    mtp, head = model.mtp, model.mtp.shared_head.head
    _own_expert_load(mtp)
    hits = repeat = total = 0
    for first in range(0, len(examples), batch_seqs):
        group = examples[first:first + batch_seqs]
        next_ids, hidden, cos, sin, attn, rows, targets, _ = _pack(model, group)
        out = mtp(next_ids, hidden, cos, sin, attn, None).index_select(0, rows)
        for start in range(0, out.shape[0], chunk_rows):
            guess = head(out[start:start + chunk_rows]).argmax(-1)
            hits += int((guess == targets[start:start + chunk_rows]).sum())
        repeat += int((next_ids.index_select(0, rows) == targets).sum())
        total += targets.shape[0]
    return {"acceptance": hits / max(1, total), "repeat_last": repeat / max(1, total), "positions": total}


# -- writing --------------------------------------------------------------------------------------

def _write_layer(model, model_dir: Path, out_dir: Path | None) -> list[Path]:
    """Write the MTP layer's trained tensors -> the weight files written."""
    args = model.args
    prefix = f"model.layers.{args.num_hidden_layers}."
    trained = {prefix + name: t.detach() for name, t in model.mtp.state_dict().items()
               if not name.endswith(FROZEN)}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in sorted(model_dir.iterdir()):
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX:
                shutil.copy2(item, out_dir / item.name)
    target = out_dir or model_dir
    if (model_dir / INDEX).exists():
        return _write_sharded(model_dir, target, prefix, trained, args)
    with safe_open(str(model_dir / SINGLE), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors.update(_encode(trained, tensors, args))
    _save_atomic(tensors, target / SINGLE, metadata)
    return [target / SINGLE]


def _encode(trained: dict[str, torch.Tensor], source: dict[str, torch.Tensor], args: ModelArgs) -> dict:
    """Trained fp32 tensors -> as the source stored them: its dtype, or FP8 with a new `_scale_inv`."""
    out = {}
    for name, value in trained.items():
        if name not in source:
            raise ValueError(f"tensor {name!r} is not in the checkpoint: cannot write it back")
        stored = source[name]
        if stored.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and name + "_scale_inv" in source:
            q, scale_inv = quantize_blockwise(value, tuple(args.fp8_block_size))
            out[name] = q.to(stored.dtype)
            out[name + "_scale_inv"] = scale_inv.to(source[name + "_scale_inv"].dtype)
        else:
            out[name] = value.to(stored.dtype).contiguous()
    return out


def _write_sharded(model_dir: Path, target: Path, prefix: str, trained: dict[str, torch.Tensor],
                   args: ModelArgs) -> list[Path]:
    """A sharded checkpoint: every tensor of the MTP layer goes to one new shard; shards that held
    some of them and other tensors are rewritten without them (new names); the others are kept
    (copied for --out). The index is replaced atomically last; in place, the shards it no longer
    names are removed after it."""
    index = json.loads((model_dir / INDEX).read_text())
    weight_map: dict[str, str] = index["weight_map"]
    layer_names = sorted(n for n in weight_map if n.startswith(prefix))
    affected = sorted({weight_map[n] for n in layer_names})
    layer: dict[str, torch.Tensor] = {}
    rewritten: dict[str, dict[str, torch.Tensor]] = {}
    metadata = {"format": "pt"}
    for shard in affected:
        with safe_open(str(model_dir / shard), framework="pt") as f:
            metadata = f.metadata() or metadata
            rest = {}
            for name in f.keys():
                (layer if name.startswith(prefix) else rest)[name] = f.get_tensor(name)
        if rest:
            rewritten[shard] = rest
    layer.update(_encode(trained, layer, args))
    new_map = dict(weight_map)
    written = []
    files = [("model-mtp", layer), *((Path(shard).name.removesuffix(".safetensors"), rest)
                                     for shard, rest in rewritten.items())]
    for stem, tensors in files:
        name = f"{stem.split('.')[0]}.{_digest(tensors)}.safetensors"
        _save_atomic(tensors, target / name, metadata)
        written.append(target / name)
        for tensor_name in tensors:
            new_map[tensor_name] = name
    if target != model_dir:
        for shard in sorted(set(weight_map.values()) - set(affected)):
            shutil.copy2(model_dir / shard, target / shard)
    sizes = {}
    for shard in set(new_map.values()):
        with safe_open(str(target / shard), framework="pt") as f:
            for name in f.keys():
                sizes[name] = math.prod(f.get_slice(name).get_shape()) * _itemsize(f.get_slice(name).get_dtype())
    new_index = {**index, "metadata": {**index.get("metadata", {}), "total_size": sum(sizes[n] for n in new_map)},
                 "weight_map": dict(sorted(new_map.items()))}
    _replace_atomic(target / INDEX, (json.dumps(new_index, indent=2) + "\n").encode())
    if target == model_dir:
        for shard in set(weight_map.values()) - set(new_map.values()):
            (model_dir / shard).unlink(missing_ok=True)
    return written


def _itemsize(dtype: str) -> int:
    from shared.model.safetensors_io import DTYPES

    return DTYPES[dtype].itemsize


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=6)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None) -> None:
    with _atomic(path) as tmp:
        save_file({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata=metadata or {"format": "pt"})


def _replace_atomic(path: Path, data: bytes) -> None:
    with _atomic(path) as tmp:
        Path(tmp).write_bytes(data)


@contextlib.contextmanager
def _atomic(path: Path):
    """A temporary file beside `path` to write; on success it replaces `path` (keeping its mode),
    on failure it is removed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _keep_mode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _keep_mode(old: Path, new: str) -> None:
    """A file replaced in place keeps its permissions (mkstemp creates 0600, as save_file does)."""
    if old.exists():
        shutil.copymode(old, new)
