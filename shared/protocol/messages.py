"""Every struct that crosses a Redis stream, and nothing else (SGLang's io_struct.py).

Named by the hop they travel: GenerateRequest (gateway -> tokenizer) -> TokenizedRequest
(tokenizer -> cache -> balancer) -> PrefillTask (balancer -> a prefill rank) -> KVChunk (prefill
-> a decode rank, one per layer) and TokenDelta (prefill/decode -> the request's gateway, through
detokenization). Each carries the request id and one trace id. Encoding: shared/protocol/wire.py.
"""
from __future__ import annotations

from shared.protocol.wire import TensorBlob, message


@message("params")
class Sampling:
    """Sampling parameters as the gateway resolved them (defaults already applied)."""

    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: list[str] | None = None  # stop strings, matched on detokenized text
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


@message("generate")
class GenerateRequest:
    request_id: str
    trace_id: str
    gateway_id: str  # replies go to this gateway instance's delta stream
    sampling: Sampling
    deadline: float  # unix seconds; nothing waits past it
    prompt_text: str | None = None  # a text completion
    prompt_ids: list[int] | None = None  # token ids given by the client
    chat: list[dict[str, str]] | None = None  # chat messages, rendered with the model's template
    cache_salt: str | None = None


@message("tokenized")
class TokenizedRequest:
    request_id: str
    trace_id: str
    gateway_id: str
    sampling: Sampling
    deadline: float
    prompt_ids: list[int]
    cache_salt: str | None = None
    num_cached_tokens: int = 0  # prefix tokens the cache service found (whole 64-token blocks)
    # A request resumed after its decode rank died: the last `resumed` ids of prompt_ids are output
    # the client already has; its next token is output index `resumed` (shared/runtime/ownership.py).
    resumed: int = 0


@message("prefill")
class PrefillTask:
    request: TokenizedRequest
    decode_rank: int  # chosen at admission, so prefill can stream KV to it layer by layer
    decode_group: str = "decode"  # the decode rank's group (--ep-group-id)


@message("kv")
class KVChunk:
    """One layer of a prompt's latent KV, prefill -> decode. A handoff is `num_layers` chunks
    (layers 0..num_layers-1: the main model's, then the MTP layer's when the model has one), sent
    each as soon as its layer is computed, then a final chunk (`final`, layer -1, no KV) that
    carries the first token, sampled after the last main layer, and with an MTP layer the main
    model's hidden state at the prompt's last position."""

    request_id: str
    trace_id: str
    layer: int
    num_layers: int  # KV layers in the handoff (the MTP layer's included)
    kv: TensorBlob  # [prompt tokens, kv_lora_rank + qk_rope_head_dim]
    checksum: str  # XXH3-128 of kv.data (final chunk: of hidden.data); a mismatch: the request is re-prefilled
    # On the final chunk only: what the decode rank needs to continue the request.
    request: TokenizedRequest | None = None
    first_token: int = -1
    finish_reason: str | None = None  # the first token already ended the request: drop the KV
    computed_at: float = 0.0  # unix seconds when prefill finished computing this layer
    sent_at: float = 0.0  # unix seconds when prefill wrote this chunk (layer-wise streaming shows)
    final: bool = False  # the end of the handoff (schema 2; schema 1 marked it with layer == num_layers)
    hidden: TensorBlob | None = None  # [hidden_size]: the MTP layer's input at the last prompt position


@message("delta")
class TokenDelta:
    """Workers -> tokenizer (ids only) -> the request's gateway (with text)."""

    request_id: str
    trace_id: str
    gateway_id: str
    index: int  # output index of token_ids[0]: the gateway drops duplicates and notices gaps
    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | abort | error
    # NOTE: detokenizing this delta needs only what it carries: the few preceding token ids (and
    # the text tail for stop strings), so any tokenizer replica can take it.
    prefix_ids: list[int] | None = None
    stop: list[str] | None = None  # the request's stop strings, matched on the text
    text: str | None = None  # set by the tokenizer on its way to the gateway
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_ids: list[int] | None = None  # on index 0 only: the prompt as tokenized (return_token_ids)
    error: str | None = None
    status: int = 0  # with finish_reason "error": the HTTP status it means (400 bad input, 503 no capacity)


@message("abort")
class Abort:
    request_id: str
    trace_id: str
    reason: str


@message("notice")
class Notice:
    """A process of the system is gone (`death`: it exited, or a restarted successor found it
    gone) or going (`leave`: it drains), or wants a successor (`handover`: the only rank of its
    role was told to stop, and serves until another instance takes its place). Published at once,
    so that nobody waits out a timeout or a heartbeat TTL for it (shared/runtime/notices.py)."""

    kind: str  # death | leave | handover
    role: str  # its service: tokenizer, cache, balancer, prefill, decode, gateway
    instance_id: str  # "" when the publisher could not tell (no load report left)
    group_id: str = ""  # a worker's EP group (--ep-group-id, by default the role)
    rank: int = -1  # a worker's rank in its group; -1 for the other services
    ep_size: int = 1
    incarnation: bytes = b""  # the EP transport incarnation it names; b"": the one its peers know now
    reason: str = ""  # e.g. "exit -9", "restarted", "sigterm"
    time: float = 0.0


def attention_compute(new_tokens: int, cached_tokens: int) -> float:
    """The core-attention work of prefilling `new_tokens` after `cached_tokens`, in the unit of
    `LoadReport.pending_compute`: new x (cached + new)."""
    return float(new_tokens * (cached_tokens + new_tokens))


@message("load")
class LoadReport:
    """A worker rank's load, for the prefill and decode balancers."""

    role: str  # prefill | decode
    rank: int
    instance_id: str
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    max_running: int = 0
    pending_compute: float = 0.0  # sum of new x (cached + new) over queued prefills
    pending_input_tokens: int = 0
    time: float = 0.0
    group_id: str = ""  # its group (--ep-group-id); "": the role's default group


@message("expert_load")
class ExpertLoad:
    """An EP rank's routed-token counts since it started, for the expert-parallel balancer (EPLB)."""

    role: str  # prefill | decode
    group_id: str
    rank: int
    ep_size: int
    num_slots: int  # physical expert slots per MoE layer (logical experts + redundant)
    num_groups: int  # the model's expert groups (n_group): the hierarchical policy packs them on nodes
    placement_version: int  # the placement this rank computes with now
    counts: list[list[int]]  # [MoE layers][logical experts], cumulative
    time: float = 0.0


@message("placement")
class PlacementUpdate:
    """A new expert placement for one EP group: ranks stage its slots, then switch together."""

    version: int  # increases by one per rollout; ranks report which one they use
    phy2log: list[list[int]]  # [MoE layers][slots]: the logical expert of each physical slot
    max_mean_before: float = 0.0  # rank-load balance of the window it was computed on, old placement
    max_mean_after: float = 0.0  # the same window, new placement
    time: float = 0.0  # when EPLB published it (Unix time; 0: an older balancer, not said)
