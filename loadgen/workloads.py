"""The requests a load-generator run sends: synthetic (random, shared-prefix, multi-turn) or read
from a file (ShareGPT JSON, Mooncake JSONL trace). Pure: no I/O but reading the file.

Lengths are uniform in [len·(1−R), len·(1+R)] as `vllm bench serve`'s random dataset, drawn from
one numpy generator seeded by `--seed`, so a run repeats exactly. Prompts are token-id lists
(drawn from [FIRST_TOKEN_ID, vocab_size)) or, with `--prompt-format text`, words; a text prompt's
token count is only approximated by its word count.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FIRST_TOKEN_ID = 3  # pad 0, bos 1, eos 2 stay out of synthetic prompts
TRACE_BLOCK_TOKENS = 512  # Mooncake's hash_ids each name one 512-token block
CACHE_BLOCK_TOKENS = 64  # the prefix cache's block (services/README.md)
SHAREGPT_MAX_PROMPT_WORDS = 1024  # vllm's ShareGPT filter: prompt <= 1024, prompt + output <= 2048
SHAREGPT_MAX_TOTAL_WORDS = 2048
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
         "by word but not what all were we when your can said there use an each which she do how their if will "
         "up other about out many then them these so some her would make like him into time has look two more "
         "write go see number no way could people my than first water been call who oil its now find long down "
         "day did get come made may part server model token cache expert block stream").split()


class WorkloadError(ValueError):
    """A workload file that cannot be used: the message names the line or entry and the problem."""


@dataclass
class Conversation:
    """A multi-turn chat: turn n+1 sends turn n's messages + the actual reply + a new user message."""
    user_messages: list[str]
    output_lens: list[int]
    messages: list[dict[str, str]] = field(default_factory=list)  # the history sent so far, replies included
    usages: list[tuple[int, int]] = field(default_factory=list)  # (prompt, completion) tokens per finished turn


@dataclass
class Request:
    output_len: int  # max_tokens (exact with ignore_eos)
    prompt: list[int] | str | None = None  # /v1/completions; None for a conversation's turn
    arrival_s: float | None = None  # trace replay: seconds after the run starts
    conversation: Conversation | None = None
    turn: int = 0

    def messages(self) -> list[dict[str, str]]:
        """The chat messages of this turn: the history + this turn's user message."""
        return [*self.conversation.messages, {"role": "user", "content": self.conversation.user_messages[self.turn]}]

    def record_reply(self, text: str, prompt_tokens: int, completion_tokens: int) -> Request | None:
        """Add this turn and the assistant's actual reply to the history; the next turn, if any."""
        conv = self.conversation
        if conv is None:
            return None
        conv.messages = [*self.messages(), {"role": "assistant", "content": text}]
        conv.usages.append((prompt_tokens, completion_tokens))
        if self.turn + 1 >= len(conv.user_messages):
            return None
        return Request(conv.output_lens[self.turn + 1], conversation=conv, turn=self.turn + 1)


@dataclass
class Workload:
    name: str
    requests: list[Request]  # ready at the start (a conversation's first turn only)
    num_requests: int  # every request the run will send, later turns included
    conversations: list[Conversation] = field(default_factory=list)


def uniform_lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> list[int]:
    low, high = max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, n).tolist()


def make_prompt(rng: np.random.Generator, n: int, prompt_format: str, vocab_size: int) -> list[int] | str:
    if prompt_format == "text":
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))
    return rng.integers(FIRST_TOKEN_ID, vocab_size, n).tolist()


def join_prompts(head: list[int] | str, tail: list[int] | str) -> list[int] | str:
    return f"{head} {tail}" if isinstance(head, str) else head + tail


def random_workload(opts, rng: np.random.Generator) -> Workload:
    n = opts.num_requests
    inputs, outputs = (uniform_lengths(rng, opts.input_len, opts.range_ratio, n),
                       uniform_lengths(rng, opts.output_len, opts.range_ratio, n))
    requests = [Request(o, make_prompt(rng, i, opts.prompt_format, opts.vocab_size)) for i, o in zip(inputs, outputs)]
    return Workload("random", requests, n)


def shared_prefix_workload(opts, rng: np.random.Generator) -> Workload:
    """Request i: prefix i % num_prefixes (prefix_len tokens), then a unique suffix of ~input_len tokens."""
    n = opts.num_requests
    prefixes = [make_prompt(rng, opts.prefix_len, opts.prompt_format, opts.vocab_size)
                for _ in range(opts.num_prefixes)]
    suffixes, outputs = (uniform_lengths(rng, opts.input_len, opts.range_ratio, n),
                         uniform_lengths(rng, opts.output_len, opts.range_ratio, n))
    requests = [Request(o, join_prompts(prefixes[i % len(prefixes)], make_prompt(rng, s, opts.prompt_format,
                                                                                   opts.vocab_size)))
                for i, (s, o) in enumerate(zip(suffixes, outputs))]
    return Workload("shared-prefix", requests, n)


def multi_turn_workload(opts, rng: np.random.Generator) -> Workload:
    """ceil(N / num_turns) conversations of num_turns turns (the last one shorter): N requests in all."""
    n, turns = opts.num_requests, opts.num_turns
    conversations = []
    for c in range(math.ceil(n / turns)):
        k = min(turns, n - c * turns)
        users = [make_prompt(rng, m, "text", opts.vocab_size)
                 for m in uniform_lengths(rng, opts.input_len, opts.range_ratio, k)]
        conversations.append(Conversation(users, uniform_lengths(rng, opts.output_len, opts.range_ratio, k)))
    requests = [Request(conv.output_lens[0], conversation=conv) for conv in conversations]
    return Workload("multi-turn", requests, n, conversations)


def cache_hit_rate_max(conversations: list[list[tuple[int, int]]], block: int = CACHE_BLOCK_TOKENS) -> float:
    """The best hit rate a `block`-token prefix cache could reach (loadgen/README.md, "Workloads").

    Each conversation is its finished turns' (prompt_tokens, completion_tokens). Turn n+1 can hit
    block·⌊min(prompt_n + completion_n, prompt_{n+1} − 1) / block⌋ tokens (whole blocks of what
    turn n stored; never the last prompt token); the rate divides by every turn's prompt tokens.
    """
    cacheable = total = 0
    for turns in conversations:
        total += sum(p for p, _ in turns)
        for (p_prev, c_prev), (p, _) in zip(turns, turns[1:]):
            cacheable += block * (max(0, min(p_prev + c_prev, p - 1)) // block)
    return cacheable / total if total else 0.0


def sharegpt_workload(opts, rng: np.random.Generator) -> Workload:
    """The first human turn of each entry as a text prompt; the gpt turn after it sets the output
    length in words (or --output-len when given). Entries in file order, cycled if too few."""
    entries = _read_json_list(opts.dataset_path)
    pairs = []
    for i, entry in enumerate(entries):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise WorkloadError(f"{opts.dataset_path}: entry {i}: needs a 'conversations' list, got {_brief(entry)}")
        for j, turn in enumerate(turns):
            if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                    and isinstance(turn.get("value"), str)):
                raise WorkloadError(f"{opts.dataset_path}: entry {i}: conversations[{j}] needs string 'from' and "
                                    f"'value', got {_brief(turn)}")
        pair = next(((a["value"], b["value"]) for a, b in zip(turns, turns[1:])
                     if a["from"] == "human" and b["from"] == "gpt"), None)
        if pair is None:
            continue  # no human turn answered by gpt: nothing to replay
        prompt_words, output_words = len(pair[0].split()), len(pair[1].split())
        if prompt_words < 1 or prompt_words > SHAREGPT_MAX_PROMPT_WORDS or \
                prompt_words + output_words > SHAREGPT_MAX_TOTAL_WORDS:
            continue
        pairs.append((pair[0], opts.output_len or max(1, output_words)))
    if not pairs:
        raise WorkloadError(f"{opts.dataset_path}: no entry has a human turn answered by a gpt turn "
                            f"(prompt <= {SHAREGPT_MAX_PROMPT_WORDS} words)")
    n = opts.num_requests or len(pairs)
    requests = [Request(out, prompt) for prompt, out in (pairs[i % len(pairs)] for i in range(n))]
    return Workload("sharegpt", requests, n)


def trace_workload(opts, rng: np.random.Generator) -> Workload:
    """Mooncake JSONL: equal hash ids give equal 512-token blocks; arrivals at the trace's times."""
    rows = []
    with open(opts.dataset_path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                rows.append(_trace_row(opts.dataset_path, number, line))
    if not rows:
        raise WorkloadError(f"{opts.dataset_path}: the trace has no lines")
    rows = rows[:opts.num_requests] if opts.num_requests else rows
    t0, blocks = rows[0][0], {}
    requests = []
    for timestamp, input_len, output_len, hash_ids in rows:
        parts = [_block(blocks, opts, h) for h in hash_ids]
        tail = input_len - TRACE_BLOCK_TOKENS * (len(hash_ids) - 1)
        parts[-1] = parts[-1][:tail] if opts.prompt_format == "ids" else " ".join(parts[-1].split()[:tail])
        prompt = parts[0]
        for part in parts[1:]:
            prompt = join_prompts(prompt, part)
        requests.append(Request(output_len, prompt, arrival_s=(timestamp - t0) / 1000.0 / opts.trace_speedup))
    return Workload("trace", requests, len(requests))


def _trace_row(path: Path, number: int, line: str) -> tuple[float, int, int, list[int]]:
    where = f"{path}: line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {_brief(row)}")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in row:
            raise WorkloadError(f"{where}: missing {key!r}")
    ts, n_in, n_out, hash_ids = row["timestamp"], row["input_length"], row["output_length"], row["hash_ids"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0:
        raise WorkloadError(f"{where}: timestamp={ts!r}: must be a number of milliseconds >= 0")
    for key, value in (("input_length", n_in), ("output_length", n_out)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise WorkloadError(f"{where}: {key}={value!r}: must be an integer >= 1")
    if not isinstance(hash_ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0
                                                 for h in hash_ids):
        raise WorkloadError(f"{where}: hash_ids={_brief(hash_ids)}: must be a list of integers >= 0")
    if len(hash_ids) != math.ceil(n_in / TRACE_BLOCK_TOKENS):
        raise WorkloadError(f"{where}: {len(hash_ids)} hash_ids for input_length={n_in}: expected "
                            f"ceil({n_in}/{TRACE_BLOCK_TOKENS}) = {math.ceil(n_in / TRACE_BLOCK_TOKENS)}")
    return ts, n_in, n_out, hash_ids


def _block(blocks: dict, opts, hash_id: int) -> list[int] | str:
    """The 512 tokens of one hash id: a function of (seed, hash id) only."""
    if hash_id not in blocks:
        blocks[hash_id] = make_prompt(np.random.default_rng([opts.seed, hash_id]), TRACE_BLOCK_TOKENS,
                                      opts.prompt_format, opts.vocab_size)
    return blocks[hash_id]


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def _brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


BUILDERS = {"random": random_workload, "shared-prefix": shared_prefix_workload, "multi-turn": multi_turn_workload,
            "sharegpt": sharegpt_workload, "trace": trace_workload}


def build(opts) -> Workload:
    """The workload `opts.workload` names, from `opts` (the parsed flags)."""
    return BUILDERS[opts.workload](opts, np.random.default_rng(opts.seed))
