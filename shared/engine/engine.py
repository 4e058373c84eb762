"""The batched engine: add a request, abort a request, step -> deltas.

`step()` is schedule, run, postprocess. The engine is synchronous and single-threaded; services
call it from their compute thread.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shared.cache.hashing import BLOCK_SIZE, root_hash
from shared.engine.block_manager import BlockManager
from shared.engine.runner import ModelRunner
from shared.engine.sampler import Sampler
from shared.engine.scheduler import ScheduledSeq, Scheduler
from shared.engine.sequence import SamplingParams, Sequence, Status
from shared.model.kv_cache import LatentKVPool
from shared.model.model import DeepseekV3


class RequestError(ValueError):
    """A request the engine refuses; `field` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_bytes: int = 512 << 20  # latent KV budget, preallocated
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    mode: str = "mixed"  # mixed | prefill | decode
    share_prefixes: bool = True
    model_fingerprint: str = ""  # seeds the block hash chain (shared/cache/hashing.py)
    speculative_tokens: int = 0  # drafts per running request and step, by the model's MTP layer; 0: off


@dataclass
class SpecStats:
    """Speculative decoding's counters since the engine started (vLLM's spec_decode_* meanings):
    a draft is one request's drafts of one step; accepted_per_pos[k]: drafts accepted at position k+1."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)


@dataclass
class Delta:
    """New tokens of one request from one step; `index` is the output index of token_ids[0]."""

    request_id: str
    index: int
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    num_cached_tokens: int = 0  # prompt tokens served from shared blocks
    kv: torch.Tensor | None = None  # prefill mode: the prompt's latent KV [layers, P, C+R]
    # prefill mode, a model with an MTP layer: the main model's hidden state at the prompt's last
    # position [D], from which decode extends the MTP layer there (its next token was unknown here)
    hidden: torch.Tensor | None = None


class Engine:
    def __init__(self, model: DeepseekV3, config: EngineConfig = EngineConfig()):
        self.model = model
        self.config = config
        token_bytes = LatentKVPool.bytes_per_token(model.args, model.dtype)
        num_blocks = config.kv_cache_bytes // (BLOCK_SIZE * token_bytes)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes}: below one block "
                             f"({BLOCK_SIZE * token_bytes} bytes)")
        self.blocks = BlockManager(num_blocks, BLOCK_SIZE, config.share_prefixes)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, config.mode)
        self.runner = ModelRunner(model, num_blocks, BLOCK_SIZE)
        self.sampler = Sampler()
        if config.speculative_tokens < 0:
            raise ValueError(f"speculative_tokens={config.speculative_tokens}: must be >= 0")
        if config.speculative_tokens and model.mtp is None:
            raise ValueError(f"speculative_tokens={config.speculative_tokens}: the model has no MTP layer "
                             "(num_nextn_predict_layers is 0 in its config.json)")
        # prefill never drafts; in prefill and decode mode a model's MTP layer keeps its KV whatever
        # N, so the handoff and the prefix cache carry its rows for whichever rank speculates next
        self.num_spec = 0 if config.mode == "prefill" else config.speculative_tokens
        self.tracks_mtp = model.mtp is not None and (self.num_spec > 0 or config.mode != "mixed")
        self.spec = SpecStats(accepted_per_pos=[0] * self.num_spec)
        self.scheduler.recompute_prefix_end = self.tracks_mtp
        # EP: the MTP layer's MoE exchanges with the group, so every rank runs it the same number of
        # times each step (the catch-up, then one per further draft), with zero tokens where it has none
        self.mtp_calls = max(1, self.num_spec) if self.tracks_mtp else 0
        self.mtp_collective = self.tracks_mtp and getattr(model.mtp.mlp, "collective", False)
        self._prefilled: list[tuple[Sequence, Delta, int]] = []  # prefill mode: handed off at the step's end
        self._undelivered: list[Delta] = []  # a failed step's tokens (step's NOTE)
        self.sequences: dict[str, Sequence] = {}
        self.seeds: dict[str, int] = {}
        self._arrivals = 0
        self.last_num_tokens = 0  # tokens computed by the last step (a metric)
        # EP: a step with nothing scheduled here still joins the group's exchanges (zero tokens)
        self.on_idle_step: Callable[[], None] | None = None
        # the prefix cache's decode side: the KV of every token of each request that finishes
        # normally (the last token's computed in one extra step, after the client has its answer)
        self.keep_finished_kv = False
        self.finished_kv: list[tuple[str, list[int], torch.Tensor | None]] = []  # (request id, token ids, KV)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    cache_salt: str | None = None, prefix_kv: torch.Tensor | None = None) -> None:
        """`prefix_kv` [layers, N, C+R]: the KV of the prompt's first N tokens (whole blocks, and
        never the last prompt token), e.g. from the on-disk prefix cache: not computed again."""
        if prefix_kv is not None and (prefix_kv.shape[1] % BLOCK_SIZE or prefix_kv.shape[1] >= len(prompt_ids)):
            raise RequestError("prefix_kv", f"{prefix_kv.shape[1]} tokens: whole {BLOCK_SIZE}-token blocks, short "
                                            f"of the {len(prompt_ids)}-token prompt's last token")
        seq = self._new_sequence(request_id, prompt_ids, params, cache_salt)
        seq.external_kv = prefix_kv
        self.scheduler.add(seq)

    def add_prefilled(self, request_id: str, prompt_ids: list[int], params: SamplingParams, first_token: int,
                      kv: torch.Tensor, cache_salt: str | None = None, hidden: torch.Tensor | None = None) -> bool:
        """Decode mode: continue a request whose prompt KV [layers, P, C+R] and first token came from
        a prefill worker. With an MTP layer, `layers` includes its KV and `hidden` [D] is the main
        model's hidden state at the prompt's last position (Delta.hidden). False (nothing kept) when
        its reserved span does not fit now."""
        layers = self.model.args.num_kv_layers
        if kv.shape[0] != layers or kv.shape[1] != len(prompt_ids):
            raise RequestError("kv", f"shape {list(kv.shape)}: expected {layers} layers of {len(prompt_ids)} "
                                     "positions (the MTP layer's included)")
        if self.tracks_mtp and hidden is None:
            raise RequestError("hidden", "missing: a model with an MTP layer needs the prompt's last hidden state")
        seq = self._new_sequence(request_id, prompt_ids, params, cache_salt, register=False)
        seq.output_ids.append(first_token)
        if not self.scheduler.can_admit_prefilled(seq):
            return False
        self.scheduler.admit_prefilled(seq)
        self.runner.write_kv(seq, kv)
        seq.num_computed = len(prompt_ids)
        if self.tracks_mtp:  # the MTP row at the last prompt position is computed with the first decode step
            seq.mtp_computed = len(prompt_ids) - 1
            seq.mtp_hidden = hidden.reshape(1, -1).to(self.runner.device, self.model.dtype)
        self._register(seq)
        return True

    def abort(self, request_id: str) -> bool:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.seeds.pop(request_id, None)
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._undelivered)

    # -- the loop ---------------------------------------------------------------------------------
    def step(self, on_layer_kv: Callable[[int, list[tuple[str, torch.Tensor]]], None] | None = None) -> list[Delta]:
        """One step. Prefill mode: `on_layer_kv(layer, [(request_id, kv [P, C+R])])` is called as soon
        as each layer's KV of the prompts completing in this step is computed, while later layers
        still run, so it can be streamed to decode.

        NOTE: a step that raises (EP: a rank died mid-exchange) leaves the engine as it was before the
        step, so the next one computes it again; except when the MTP layer's exchange fails after
        the tokens were sampled: then those tokens stand and come out with the next step's deltas."""
        undelivered, self._undelivered = self._undelivered, []
        try:
            return undelivered + self._step(on_layer_kv)
        except BaseException:
            self._undelivered = undelivered + self._undelivered
            raise

    def _step(self, on_layer_kv) -> list[Delta]:
        scheduled = self.scheduler.schedule()
        for item in scheduled:
            self._place_external_prefix(item.seq)
        self.last_num_tokens = sum(item.num_new for item in scheduled)
        if not scheduled:
            if self.on_idle_step is not None:
                self.on_idle_step()
            self._idle_mtp(self.mtp_calls)
            return []
        done = [] if on_layer_kv is None else [
            (item.seq.request_id, self.runner.slots(item.seq, len(item.seq.prompt_ids)))
            for item in scheduled if item.sample and item.seq.num_computed + item.num_new >= len(item.seq.prompt_ids)]

        def hook(layer: int) -> None:
            on_layer_kv(layer, [(rid, self.runner.pool.kv[layer, slots].clone()) for rid, slots in done])

        logits, hidden = self.runner.run(scheduled, hook if done else None)
        starts = [item.seq.num_computed for item in scheduled]
        deltas = self.postprocess(scheduled, logits)
        if self.tracks_mtp:
            try:
                self._extend_and_draft(scheduled, starts, hidden)
            except BaseException:
                self._keep_after_failure(deltas)
                raise
        if self._prefilled:
            self._hand_off(hidden, on_layer_kv)
        return deltas

    def _keep_after_failure(self, deltas: list[Delta]) -> None:
        """The MTP layer failed after sampling: the step's tokens are kept for the next step to
        return; a prompt that was to be handed off is computed again (its first token is drawn
        again the same: same seed, same index), as its MTP layer's KV is missing."""
        handed = {id(delta) for _, delta, _ in self._prefilled}
        for seq, _, _ in self._prefilled:
            seq.output_ids.pop()
            self.scheduler.preempt(seq)
        self._prefilled.clear()
        self._undelivered.extend(d for d in deltas if id(d) not in handed)

    def _hand_off(self, hidden: torch.Tensor, on_layer_kv) -> None:
        """Prefill mode, after the MTP layer caught up: the prompts computed in this step leave with
        their KV (the MTP layer's last, as one more layer) and their last hidden state."""
        if on_layer_kv is not None and self.tracks_mtp:
            mtp = self.model.args.num_hidden_layers
            on_layer_kv(mtp, [(seq.request_id, self.runner.pool.kv[mtp, self.runner.slots(seq, len(seq.prompt_ids))]
                               .clone()) for seq, _, _ in self._prefilled])
        for seq, delta, row in self._prefilled:
            delta.kv = self.runner.read_kv(seq, len(seq.prompt_ids))
            delta.hidden = hidden[row].clone() if self.tracks_mtp else None
            self._finish(seq, "prefilled")
        self._prefilled.clear()

    def _extend_and_draft(self, scheduled: list[ScheduledSeq], starts: list[int], hidden: torch.Tensor) -> None:
        """Speculative decoding, after a step: the MTP layer first catches up on every position whose
        next token is now known, from the main model's hidden states (its KV there is then right);
        its output at a running sequence's last such position drafts the token after the last one,
        and each further draft feeds the MTP layer its own output and the previous draft."""
        entries, parts, ready, updates, row = [], [], [], [], 0
        for item, start in zip(scheduled, starts):
            seq, rows = item.seq, hidden[row:row + item.num_new]
            row += item.num_new
            if seq.status is not Status.RUNNING or seq.pending_finish is not None:
                continue
            new = rows[:seq.num_computed - start]
            pending = new if seq.mtp_hidden is None else torch.cat([seq.mtp_hidden, new])
            assert pending.shape[0] == seq.num_computed - seq.mtp_computed, (seq.request_id, pending.shape)
            end = min(seq.num_computed, seq.num_tokens - 1)  # position i needs token i + 1
            count = max(0, end - seq.mtp_computed)
            if count == 0:
                seq.mtp_hidden = pending.clone() if pending.shape[0] else None
                continue
            entries.append((seq, seq.mtp_computed, seq.token_ids[seq.mtp_computed + 1:end + 1]))
            parts.append(pending[:count])
            updates.append((seq, end, pending, count))
            if item.sample and end == seq.num_tokens - 1:
                ready.append((seq, sum(len(e[2]) for e in entries) - 1))
        if not entries:
            self._idle_mtp(self.mtp_calls)
            return
        try:
            out = self.runner.run_mtp(entries, torch.cat(parts))
        except BaseException:  # EP: a rank died mid-exchange; the rows wait for the next step's catch-up
            for seq, _, pending, _ in updates:
                seq.mtp_hidden = pending.clone()
            raise
        for seq, end, pending, count in updates:
            seq.mtp_computed = end
            seq.mtp_hidden = pending[count:].clone() if pending.shape[0] > count else None
        chains = []  # (sequence, drafts it may make)
        for seq, _ in ready:
            n = min(self.num_spec, seq.params.max_tokens - len(seq.output_ids) - 1,
                    self.model.args.max_position_embeddings - seq.num_tokens)
            while n > 0 and self.blocks.blocks_needed(seq, seq.num_tokens + n) > self.blocks.num_free:
                n -= 1  # drafts never take memory a sequence needs
            if n:
                self.blocks.grow(seq, seq.num_tokens + n)
            chains.append((seq, n))
        keep = [i for i, (_, n) in enumerate(chains) if n > 0]
        if not keep:
            self._idle_mtp(self.mtp_calls - 1)
            return
        seqs, limits = [chains[i][0] for i in keep], [chains[i][1] for i in keep]
        out = out.index_select(0, torch.tensor([ready[i][1] for i in keep], device=out.device))
        drafts = [[d] for d in self.model.draft_logits(out).argmax(-1).tolist()]
        alive = list(range(len(seqs)))  # the chains still drafting, in the order of out's rows
        for k in range(1, max(limits)):
            go = [j for j, i in enumerate(alive) if limits[i] > k]
            if len(go) < len(alive):
                out = out.index_select(0, torch.tensor(go, device=out.device))
                alive = [alive[j] for j in go]
            # draft k+1 comes from the MTP layer one position on, reading draft k and its own output
            out = self.runner.run_mtp([(seqs[i], seqs[i].num_tokens - 2 + k, [drafts[i][-1]]) for i in alive], out)
            for i, d in zip(alive, self.model.draft_logits(out).argmax(-1).tolist()):
                drafts[i].append(d)
        for seq, d in zip(seqs, drafts):
            seq.draft_ids = d
        self._idle_mtp(self.mtp_calls - max(limits))

    def _idle_mtp(self, calls: int) -> None:
        """EP: this step's remaining MTP layer calls, with zero tokens (the group's exchanges)."""
        if not self.mtp_collective:
            return
        empty = torch.empty(0, self.model.args.hidden_size, dtype=self.model.dtype, device=self.runner.device)
        with torch.inference_mode():
            for _ in range(calls):
                self.model.mtp.mlp(empty)

    def _place_external_prefix(self, seq: Sequence) -> None:
        """Just admitted with an external prefix: its KV goes into the blocks the admission gave it."""
        if seq.external_kv is None:
            return
        if seq.external_from < seq.external_kv.shape[1]:
            self.runner.write_kv(seq, seq.external_kv, start=seq.external_from)
        seq.external_kv, seq.external_from = None, seq.external_kv.shape[1]

    def postprocess(self, scheduled: list[ScheduledSeq], logits: torch.Tensor) -> list[Delta]:
        """Sample every sampled row; a chunk with drafts keeps the drafts up to the first that differs
        from the token drawn at its place, then that drawn token (so the tokens are those sampling
        one at a time would give, for every seed)."""
        sampled = [item for item in scheduled if item.sample]
        rows = [(item.seq, j) for item in sampled for j in range(1 + len(item.draft))]
        tokens = self.sampler(logits, [s.params for s, _ in rows], [self.seeds[s.request_id] for s, _ in rows],
                              [s.params.first_index + len(s.output_ids) + j for s, j in rows])
        for item in scheduled:
            if not item.sample:
                item.seq.num_computed += item.num_new
                self.blocks.commit(item.seq)
        deltas, offset, end = [], 0, 0
        rows_end = {}  # each chunk's end row in the step's hidden states
        for item in scheduled:
            end += item.num_new
            rows_end[id(item)] = end
        for item in sampled:
            drawn = tokens[offset:offset + 1 + len(item.draft)]
            offset += len(drawn)
            accepted = 0
            while accepted < len(item.draft) and item.draft[accepted] == drawn[accepted]:
                accepted += 1
            if item.draft:
                self._count_spec(len(item.draft), accepted)
            # positions with the right tokens under them: the chunk's own, and the accepted drafts'
            deltas.append(self._advance(item.seq, drawn[:accepted + 1], item.num_new - len(item.draft) + accepted))
            if self._prefilled and self._prefilled[-1][0] is item.seq:
                self._prefilled[-1] = (item.seq, deltas[-1], rows_end[id(item)] - 1)
        for item in scheduled:
            if not item.sample and item.seq.pending_finish is not None and item.seq.num_uncomputed == 0:
                self._finish(item.seq, item.seq.pending_finish)  # every token's KV computed: blocks to the cache
        return deltas

    def _count_spec(self, drafted: int, accepted: int) -> None:
        self.spec.num_drafts += 1
        self.spec.num_draft_tokens += drafted
        self.spec.num_accepted_tokens += accepted
        for k in range(accepted):
            self.spec.accepted_per_pos[k] += 1

    def _advance(self, seq: Sequence, tokens: list[int], computed: int) -> Delta:
        """The step's new tokens of one sequence, up to a stop; `computed`: how many of the step's
        positions hold KV of the sequence's true tokens (the rest, rejected drafts', is overwritten)."""
        index = len(seq.output_ids)
        stops = set(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            stops.update(self.model.args.eos_token_ids)
        delta = Delta(seq.request_id, index, [], num_cached_tokens=seq.num_cached_prompt)
        max_len = self.model.args.max_position_embeddings
        for token in tokens:
            if token in stops:
                delta.finish_reason = "stop"
                break
            seq.output_ids.append(token)
            delta.token_ids.append(token)
            if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= max_len:
                delta.finish_reason = "length"
                break
        seq.num_computed = min(seq.num_computed + computed, seq.num_tokens)
        self.blocks.commit(seq)
        if self.config.mode == "prefill" and delta.finish_reason is None:
            self._prefilled.append((seq, delta, -1))  # the hidden row is set by postprocess
        elif delta.finish_reason is not None:
            if (self.keep_finished_kv and delta.finish_reason in ("stop", "length") and seq.num_uncomputed == 1
                    and seq.num_tokens % BLOCK_SIZE == 0):
                seq.pending_finish = delta.finish_reason  # the last token ends a full block: its KV next step
            else:
                self._finish(seq, delta.finish_reason)
        return delta

    def _finish(self, seq: Sequence, reason: str) -> None:
        full = seq.num_computed // BLOCK_SIZE * BLOCK_SIZE
        if self.keep_finished_kv and reason in ("stop", "length"):  # every one, so its caller may wait for it
            kv = self.runner.read_kv(seq, full) if full else None
            self.finished_kv.append((seq.request_id, seq.token_ids[:full], kv))
        self.scheduler.finish(seq, reason)
        self.sequences.pop(seq.request_id, None)
        self.seeds.pop(seq.request_id, None)

    # -- validation -------------------------------------------------------------------------------
    def _new_sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      cache_salt: str | None, register: bool = True) -> Sequence:
        args = self.model.args
        if request_id in self.sequences:
            raise RequestError("request_id", f"{request_id!r} is already running")
        if not prompt_ids:
            raise RequestError("prompt", "empty; give at least one token")
        try:
            params.validate()
        except ValueError as e:
            raise RequestError(str(e).split("=")[0], str(e)) from None
        context = args.max_position_embeddings
        if len(prompt_ids) >= context:
            raise RequestError("prompt", f"{len(prompt_ids)} tokens; the model's context is {context} tokens")
        for i, t in enumerate(prompt_ids):
            if not isinstance(t, int) or not 0 <= t < args.vocab_size:
                raise RequestError(f"prompt[{i}]", f"token id {t!r} is outside the vocabulary [0, {args.vocab_size})")
        if len(prompt_ids) + params.max_tokens > context:
            raise RequestError("max_tokens", f"{params.max_tokens} + {len(prompt_ids)} prompt tokens exceed the "
                                             f"model's context of {context} tokens")
        span = len(prompt_ids) + params.max_tokens
        if Sequence.blocks_for(span) > self.blocks.num_blocks:
            raise RequestError("max_tokens", f"prompt + max_tokens = {span} tokens can never fit the KV cache "
                                             f"({self.blocks.num_blocks * BLOCK_SIZE} tokens)")
        self._arrivals += 1
        seq = Sequence(request_id, list(prompt_ids), params, self._arrivals,
                       root_hash=root_hash(self.config.model_fingerprint, cache_salt))
        if register:
            self._register(seq)
        return seq

    def _register(self, seq: Sequence) -> None:
        self.sequences[seq.request_id] = seq
        seed = seq.params.seed
        self.seeds[seq.request_id] = seed if seed is not None else secrets.randbits(63)
        assert seq.status in (Status.WAITING, Status.RUNNING)
