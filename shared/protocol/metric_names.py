"""The names of the counters that `streamoe cost` (and dashboards) read, defined once: the
services register them from here and the cost report scrapes them by these names.

prometheus_client exposes a counter `NAME` as the sample `NAME_total`; `sample` gives that name.
"""
from __future__ import annotations

TOKENS = "streamoe_tokens"  # gateway: tokens by kind (input_cache_hit, input_cache_miss, output)
GPU_SECONDS = "streamoe_gpu_seconds"  # worker rank: seconds up, one GPU each: {role, rank}
WORKER_TOKENS = "streamoe_worker_tokens"  # worker rank: tokens computed: {role, rank, kind}
# decode rank, speculating: vLLM's spec_decode_* counters with our prefix ({role, rank}; per_pos adds position)
SPEC_DRAFTS = "streamoe_spec_decode_num_drafts"  # one request's drafts of one step
SPEC_DRAFT_TOKENS = "streamoe_spec_decode_num_draft_tokens"
SPEC_ACCEPTED_TOKENS = "streamoe_spec_decode_num_accepted_tokens"
SPEC_ACCEPTED_PER_POS = "streamoe_spec_decode_num_accepted_tokens_per_pos"  # {position}: 0 = the first draft
# the planner (services/planner): the ranks it wants per role, the ranks it sees, each change it made
PLANNER_DESIRED = "streamoe_planner_desired_ranks"  # gauge {role}
PLANNER_ACTUAL = "streamoe_planner_actual_ranks"  # gauge {role}
PLANNER_DECISIONS = "streamoe_planner_decisions"  # counter {role, direction (up, down), reason}
# the counters every service adds to the USAGE hash (shared/runtime/usage.py)
USAGE_COUNTERS = (TOKENS, GPU_SECONDS, WORKER_TOKENS)


def sample(counter: str) -> str:
    """The sample name a scrape shows for a counter."""
    return f"{counter}_total"
