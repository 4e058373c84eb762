"""Writes dashboards/streamoe.json, the Grafana dashboard: `python deploy/grafana/dashboard.py`.

The JSON is generated because its PromQL repeats itself (selectors, quantiles, the SLO attainment
below); edit this file and regenerate. tests/test_grafana.py fails when the two differ, and when an
expression names a metric the services do not define. The panels follow the gateway's live page
(services/gateway/dashboard.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "streamoe.json"
DATASOURCE_UID = "streamoe-prometheus"  # provisioning/datasources/prometheus.yaml
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
GATEWAY = 'instance=~"$instance"'  # any service's own metrics: by the instance picker
ANY_ROLE = 'role=~"$role", instance=~"$instance"'  # worker metrics ({role, group, rank}): by both pickers
# the SLO's metrics (shared/planner/slo.py METRICS) and the gateway histograms that measure them
SLO_HISTOGRAMS = {"ttft": "streamoe_ttft_seconds", "itl": "streamoe_itl_seconds", "tpot": "streamoe_tpot_seconds",
                  "e2el": "streamoe_e2e_seconds"}
# shared/cost/economics.py: GPU_HOUR_USD, PRICES_PER_MILLION (hit, miss, output)
PRICES = {"gpu_hour_usd": ("2", "USD per GPU-hour; each worker rank is one GPU"),
          "price_input_cache_hit": ("0.14", "USD per 1M input tokens served from the prefix cache"),
          "price_input_cache_miss": ("0.55", "USD per 1M input tokens computed"),
          "price_output": ("2.19", "USD per 1M output tokens")}


def role(name: str) -> str:
    return f'role="{name}", instance=~"$instance"'


def rate(metric: str, selector: str, by: str | None = None, window: str = RI) -> str:
    inner = f"rate({metric}{{{selector}}}[{window}])"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def quantiles(histogram: str, selector: str = GATEWAY, by: str = "", qs=(0.5, 0.95, 0.99),
              legend: str = "") -> list[tuple[str, str]]:
    group = f"le, {by}" if by else "le"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{{{selector}}}[{RI}])))",
             f"{legend}p{round(q * 100)}") for q in qs]


def slo_bound(metric: str) -> str:
    return f'max(streamoe_slo_target_seconds{{metric="{metric}"}})'


def bucket_bounds(histogram: str, selector: str) -> str:
    """{le="X"} with the value X, for each finite bucket bound.
    NOTE: PromQL turns no label into a number, but histogram_quantile(1, ...) over a histogram of
    two buckets, X and +Inf, one observation each, returns X."""
    tagged = f'label_replace(group by (le) ({histogram}_bucket{{{selector}}}), "bound", "$1", "le", "(.+)")'
    pair = f'{tagged} or label_replace({tagged}, "le", "+Inf", "", "")'
    return f'max by (le) (label_replace(histogram_quantile(1, {pair}), "le", "$1", "bound", "(.+)") >= 0)'


def attainment(metric: str, selector: str = GATEWAY) -> str:
    """Share of the requests within the SLO's bound for `metric`, as the live page's attainment():
    the cumulative counts at the bucket bounds around the SLO's bound, interpolated linearly (as
    histogram_quantile does); past the last finite bound, what that bound holds. Nothing where the
    SLO has no bound for `metric`."""
    histogram = SLO_HISTOGRAMS[metric]
    t = f"scalar({slo_bound(metric)})"
    counts = f"sum by (le) (rate({histogram}_bucket{{{selector}}}[{RI}]))"
    bounds = bucket_bounds(histogram, selector)
    total = f"sum(rate({histogram}_count{{{selector}}}[{RI}]))"
    lower = f"(max({bounds} <= {t}) or vector(0))"
    upper = f"min({bounds} > {t})"
    within_lower = f"(max({counts} and on (le) ({bounds} <= {t})) or vector(0))"
    within_upper = f"min({counts} and on (le) ({bounds} > {t}))"
    interpolated = f"({within_lower} + ({within_upper} - {within_lower}) * ({t} - {lower}) / ({upper} - {lower}))"
    return f"(({interpolated} / {total}) or ({within_lower} / {total})) and on () {slo_bound(metric)}"


def revenue(fn: str, window: str) -> str:
    """USD for the tokens the gateways counted, at the prices' variables."""
    parts = [f'sum({fn}(streamoe_tokens_total{{kind="{kind}", {GATEWAY}}}[{window}])) * $price_{kind}'
             for kind in ("input_cache_hit", "input_cache_miss", "output")]
    return f"({' + '.join(parts)}) / 1e6"


class Layout:
    """Panels in rows of a 24-column grid, left to right, top to bottom."""

    def __init__(self):
        self.panels: list[dict] = []
        self.x = self.y = self.height = 0

    def place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.y, self.x, self.height = self.y + self.height, 0, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x, self.height = self.x + w, max(self.height, h)
        return pos

    def add(self, panel: dict, w: int, h: int) -> dict:
        panel = {"id": len(self.panels) + 1, **panel, "gridPos": self.place(w, h)}
        self.panels.append(panel)
        return panel

    def row(self, title: str, description: str = "") -> None:
        if self.x:
            self.y, self.x, self.height = self.y + self.height, 0, 0
        self.add({"type": "row", "title": title, "description": description, "collapsed": False, "panels": []},
                 24, 1)
        self.x, self.y, self.height = 0, self.y + 1, 0

    def timeseries(self, title: str, description: str, queries: list[tuple[str, str]], unit: str = "short",
                   w: int = 8, h: int = 8, min_: float | None = 0, max_: float | None = None, stack: bool = False,
                   bars: bool = False, axis_label: str = "", overrides: list | None = None,
                   interval: str | None = None) -> None:
        custom = {"drawStyle": "bars" if bars else "line", "lineWidth": 1, "fillOpacity": 50 if bars else 10,
                  "showPoints": "never", "spanNulls": False, "axisLabel": axis_label,
                  "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
        defaults = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"},
                    **({"min": min_} if min_ is not None else {}), **({"max": max_} if max_ is not None else {})}
        self.add({"type": "timeseries", "title": title, "description": description, "datasource": DS,
                  **({"interval": interval} if interval else {}), "targets": targets(queries),
                  "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
                  "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                              "tooltip": {"mode": "multi", "sort": "desc"}}}, w, h)

    def stat(self, title: str, description: str, queries: list[tuple[str, str]], unit: str = "short",
             w: int = 4, h: int = 5, red_below: float | None = None, red_from: float | None = None) -> None:
        steps = [{"color": "green", "value": None}]
        if red_from is not None:
            steps.append({"color": "red", "value": red_from})
        if red_below is not None:
            steps = [{"color": "red", "value": None}, {"color": "green", "value": red_below}]
        self.add({"type": "stat", "title": title, "description": description, "datasource": DS,
                  "targets": targets(queries, instant=True),
                  "fieldConfig": {"defaults": {"unit": unit, "color": {"mode": "thresholds"},
                                               "thresholds": {"mode": "absolute", "steps": steps}},
                                  "overrides": []},
                  "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                              "colorMode": "value", "graphMode": "none", "justifyMode": "auto",
                              "orientation": "auto", "textMode": "auto", "wideLayout": True,
                              "showPercentChange": False}}, w, h)


def targets(queries: list[tuple[str, str]], instant: bool = False) -> list[dict]:
    return [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
             "instant": instant, "range": not instant} for i, (expr, legend) in enumerate(queries)]


SLO_LINE = [{"matcher": {"id": "byName", "options": "SLO"},
             "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                            {"id": "custom.fillOpacity", "value": 0}]}]


def panels() -> list[dict]:
    g = Layout()
    hit = f'kind="input_cache_hit", {GATEWAY}'
    inputs = f'kind=~"input_cache_hit|input_cache_miss", {GATEWAY}'
    lookup_hit = f'result="hit", {GATEWAY}'

    g.row("Overview")
    g.stat("Targets up, by service", "Scrape targets answering, per service (Prometheus' `up`).",
           [(f'sum by (service) (up{{service!="", {GATEWAY}}})', "{{service}}")], w=8)
    g.stat("Targets down", "Scrape targets that did not answer the last scrape.",
           [(f'count(up{{service!="", {GATEWAY}}} == 0) or vector(0)', "down")], w=3, red_from=1)
    g.stat("EP group members", "Ranks in each EP group now (`streamoe_ep_group_members`): fewer than its "
           "--ep-size while it runs without a dead rank.",
           [(f"min by (role, group) (streamoe_ep_group_members{{{ANY_ROLE}}})", "{{group}}")], w=5)
    g.stat("Requests in flight", "Requests the gateways admitted and have not finished.",
           [(f"sum(streamoe_gateway_inflight_requests{{{GATEWAY}}})", "in flight")])
    g.stat("Prefix-cache hit rate", "Input tokens served from the prefix cache over the time range.",
           [(f"sum(increase(streamoe_tokens_total{{{hit}}}[$__range])) / "
             f"sum(increase(streamoe_tokens_total{{{inputs}}}[$__range]))", "hit rate")], unit="percentunit")
    g.timeseries("Requests/s by outcome", "Generation requests the gateways finished "
                 "(`streamoe_requests_total{outcome}`): completed, error, aborted (the client left), timeout.",
                 [(rate("streamoe_requests_total", GATEWAY, "outcome"), "{{outcome}}")], unit="reqps")
    g.timeseries("Tokens/s by kind", "At the gateways (`streamoe_tokens_total{kind}`): prompt tokens served "
                 "from the prefix cache (input_cache_hit) or computed (input_cache_miss), output tokens.",
                 [(rate("streamoe_tokens_total", GATEWAY, "kind"), "{{kind}}"),
                  (rate("streamoe_tokens_total", inputs), "input")], axis_label="tokens/s")
    g.timeseries("Running and waiting requests", "Requests in the engines' batches and queued on the ranks, "
                 "by role; requests in flight at the gateways.",
                 [(f"sum by (role) (streamoe_running_requests{{{ANY_ROLE}}})", "{{role}} running"),
                  (f"sum by (role) (streamoe_waiting_requests{{{ANY_ROLE}}})", "{{role}} waiting"),
                  (f"sum(streamoe_gateway_inflight_requests{{{GATEWAY}}})", "in flight at the gateways")])

    g.row("Latency and SLO", "Quantiles of the gateways' histograms; the red dashed line is the SLO's bound "
          "(`streamoe_slo_target_seconds`, from the gateway's --slo).")
    for metric, title, what in (("ttft", "TTFT", "time to first token"), ("itl", "ITL", "time between token deltas"),
                                ("tpot", "TPOT", "time per output token after the first"),
                                ("e2el", "End-to-end latency", "arrival to last token")):
        g.timeseries(f"{title} p50 / p95 / p99", f"{title}: {what} (`{SLO_HISTOGRAMS[metric]}`).",
                     quantiles(SLO_HISTOGRAMS[metric]) + [(slo_bound(metric), "SLO")], unit="s", w=6,
                     overrides=SLO_LINE)
    g.timeseries("SLO attainment", "Share of the requests within each bound the SLO sets. NOTE: from the "
                 "histogram buckets, interpolated linearly between the bucket bounds around the SLO's bound, "
                 "as the gateway's live page does: exact when the bound is a bucket bound.",
                 [(attainment(metric), metric) for metric in SLO_HISTOGRAMS], unit="percentunit", max_=1, w=12)
    g.timeseries("HTTP answers/s by code", "Every HTTP answer of the gateways, by status code.",
                 [(rate("streamoe_http_requests_total", GATEWAY, "code"), "{{code}}")], unit="reqps", w=12)

    g.row("Cost and revenue", "As `streamoe cost` (shared/cost/README.md): each worker rank is one GPU at "
          "$gpu_hour_usd per GPU-hour; revenue prices every token at R1's prices per 1M tokens. NOTE: from the "
          "live counters, which leave with a rank that stops; `streamoe cost` reads the totals that outlive "
          "it (the gateway's /usage).")
    cost = f"sum(increase(streamoe_gpu_seconds_total{{{GATEWAY}}}[$__range])) / 3600 * $gpu_hour_usd"
    earned = revenue("increase", "$__range")
    g.stat("Cost", "GPU-hours of the worker ranks over the time range, at $gpu_hour_usd each.",
           [(cost, "cost")], unit="currencyUSD", h=8)
    g.stat("Revenue", "The tokens of the time range at $price_input_cache_hit / $price_input_cache_miss / "
           "$price_output per 1M (cache hit / miss / output).", [(earned, "revenue")], unit="currencyUSD", h=8)
    g.stat("Margin", "(revenue - cost) / cost over the time range.",
           [(f"({earned} - {cost}) / ({cost})", "margin")], unit="percentunit", h=8, red_below=0)
    g.timeseries("Cost and revenue per hour", "Live: GPUs up times the GPU-hour price, and tokens/s at the "
                 "token prices, in USD per hour.",
                 [(f"{rate('streamoe_gpu_seconds_total', GATEWAY)} * $gpu_hour_usd", "cost"),
                  (f"3600 * {revenue('rate', RI)}", "revenue")], unit="currencyUSD", h=8)
    g.timeseries("GPUs", "Worker ranks up, by role: GPU-seconds per second (`streamoe_gpu_seconds_total`).",
                 [(rate("streamoe_gpu_seconds_total", ANY_ROLE, "role"), "{{role}}")], w=4, h=8)

    g.row("Prefix cache")
    g.timeseries("Prefix-cache hit rate", "Prompt tokens served from the on-disk prefix cache: at the "
                 "gateways (hit / (hit + miss)), and of the cache service's lookups.",
                 [(f"{rate('streamoe_tokens_total', hit)} / {rate('streamoe_tokens_total', inputs)}", "gateways"),
                  (f"{rate('streamoe_cache_lookup_tokens_total', lookup_hit)} / "
                   f"{rate('streamoe_cache_lookup_tokens_total', GATEWAY)}", "cache service lookups")],
                 unit="percentunit", max_=1)
    g.timeseries("Input tokens/s: from the cache vs computed", "Prompt tokens served from the cache "
                 "(input_cache_hit) and computed by prefill (input_cache_miss), stacked.",
                 [(rate("streamoe_tokens_total", inputs, "kind"), "{{kind}}")], stack=True, axis_label="tokens/s")
    g.timeseries("Block store", "Blocks/s the workers write to the prefix cache, and that the cache service "
                 "evicts to stay under its capacity.",
                 [(rate("streamoe_cache_blocks_written_total", ANY_ROLE, "role"), "written by {{role}}"),
                  (rate("streamoe_cache_evicted_blocks_total", GATEWAY), "evicted")])

    for name in ("prefill", "decode"):
        ranks = role(name)
        g.row(name.capitalize(), f"The {name} ranks: a series per EP group and rank, named group/rank.")
        g.timeseries("Running and waiting requests", f"Requests in each {name} rank's batch and queued on it.",
                     [(f"streamoe_running_requests{{{ranks}}}", "{{group}}/{{rank}} running"),
                      (f"streamoe_waiting_requests{{{ranks}}}", "{{group}}/{{rank}} waiting")])
        if name == "prefill":
            g.timeseries("Input tokens/s per rank", "Prompt tokens each prefill rank computed "
                         "(input_cache_miss) or took from the cache (`streamoe_worker_tokens_total{kind}`).",
                         [(rate("streamoe_worker_tokens_total", ranks, "group, rank, kind"),
                           "{{group}}/{{rank}} {{kind}}")], axis_label="tokens/s")
        else:
            g.timeseries("Output tokens/s per rank", "Tokens each decode rank generated "
                         "(`streamoe_worker_tokens_total`).",
                         [(rate("streamoe_worker_tokens_total", ranks, "group, rank"), "{{group}}/{{rank}}")],
                         axis_label="tokens/s")
        g.timeseries("KV cache usage per rank", "KV blocks in use (reserved included) over the pool "
                     "(`streamoe_kv_blocks_used / streamoe_kv_blocks_total`); near 1, requests wait for blocks.",
                     [(f"streamoe_kv_blocks_used{{{ranks}}} / streamoe_kv_blocks_total{{{ranks}}}",
                       "{{group}}/{{rank}}")], unit="percentunit", max_=1)
        g.timeseries("Step time", "Engine step time per rank (`streamoe_step_seconds`).",
                     quantiles("streamoe_step_seconds", ranks, "group, rank", (0.5, 0.95), "{{group}}/{{rank}} "),
                     unit="s")
        g.timeseries("Tokens per step", "Tokens computed per engine step (`streamoe_batch_tokens`).",
                     quantiles("streamoe_batch_tokens", ranks, "group, rank", (0.5, 0.95), "{{group}}/{{rank}} "))
        if name == "prefill":
            g.timeseries("KV handoff sent", "Latent KV bytes/s each prefill rank sends to decode ranks.",
                         [(rate("streamoe_kv_handoff_bytes_total", ranks, "group, rank"), "{{group}}/{{rank}}")],
                         unit="Bps")
            continue
        g.timeseries("KV handoff latency", "From prefill computing the last layer to the whole handoff here "
                     "(`streamoe_kv_handoff_seconds`).", quantiles("streamoe_kv_handoff_seconds", ranks),
                     unit="s")
        g.timeseries("KV handoffs/s", "Handoffs received, by whether layer 0 arrived before prefill had "
                     "computed the last layer (layerwise=yes: streamed), and handoffs refused (missing or "
                     "corrupt KV) and sent back to prefill.",
                     [(rate("streamoe_kv_handoffs_total", ranks, "layerwise"), "layerwise={{layerwise}}"),
                      (rate("streamoe_kv_reprefills_total", ranks), "re-prefilled")], unit="reqps")
        accepted, drafts = "streamoe_spec_decode_num_accepted_tokens_total", "streamoe_spec_decode_num_drafts_total"
        g.timeseries("Speculative decoding: acceptance", "Draft tokens accepted over those the MTP layer "
                     "proposed, and per draft position (0: the first). Empty without speculation.",
                     [(f"{rate(accepted, ranks)} / {rate('streamoe_spec_decode_num_draft_tokens_total', ranks)}",
                       "all positions"),
                      (f"{rate('streamoe_spec_decode_num_accepted_tokens_per_pos_total', ranks, 'position')} / "
                       f"scalar({rate(drafts, ranks)})", "position {{position}}")],
                     unit="percentunit", max_=1)
        g.timeseries("Speculative decoding: accepted tokens per draft", "Draft tokens accepted per draft (one "
                     "request's drafts of one step): such a step emits this many tokens plus one.",
                     [(f"{rate(accepted, ranks, 'group')} / {rate(drafts, ranks, 'group')}", "{{group}}")])

    g.row("Experts and EP", "Routed-expert load (`streamoe_expert_tokens_total`) and the EP groups' exchanges, "
          "for the roles picked.")
    experts = f"sum by (role, layer, expert) (rate(streamoe_expert_tokens_total{{{ANY_ROLE}}}[{RI}]))"
    per_layer = f"max by (role, layer) ({experts}) / avg by (role, layer) ({experts})"
    peers = f"sum by (role, group, peer) (rate(streamoe_ep_dispatched_tokens_total{{{ANY_ROLE}}}[{RI}]))"
    g.timeseries("EP imbalance", "Per EP group: tokens dispatched to its busiest rank over the mean per rank "
                 "(`streamoe_ep_dispatched_tokens_total{peer}`). 1 is even; EPLB lowers it.",
                 [(f"max by (role, group) ({peers}) / avg by (role, group) ({peers})", "{{group}}")], min_=1)
    g.timeseries("Expert imbalance", "Tokens routed to the busiest expert of a layer over the mean per expert: "
                 "the worst layer, and the mean over the layers.",
                 [(f"max by (role) ({per_layer})", "{{role}} worst layer"),
                  (f"avg by (role) ({per_layer})", "{{role}} mean over layers")], min_=1)
    g.timeseries("EP exchange latency p95", "Dispatch and combine, from the start of the exchange to every "
                 "rank's answer (`streamoe_ep_exchange_seconds`).",
                 quantiles("streamoe_ep_exchange_seconds", ANY_ROLE, "role, phase", (0.95,), "{{role}} {{phase}} "),
                 unit="s")
    # NOTE: one heatmap per layer picked (`repeat`); a series per expert, its name the expert's number,
    # which the heatmap sorts numerically into rows.
    g.add({"type": "heatmap", "title": "Expert load, layer $layer", "repeat": "layer", "repeatDirection": "h",
           "maxPerRow": 2, "datasource": DS,
           "description": "Tokens/s routed to each expert of the layer, summed over the ranks of the roles picked.",
           "targets": targets([(f'sum by (expert) (rate(streamoe_expert_tokens_total{{{ANY_ROLE}, layer=~"$layer"}}'
                                f"[{RI}]))", "{{expert}}")]),
           "fieldConfig": {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []},
           "options": {"calculate": False, "cellGap": 1, "rowsFrame": {"layout": "unknown"},
                       "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5,
                                 "fill": "dark-orange", "reverse": False, "scale": "exponential"},
                       "yAxis": {"axisPlacement": "left", "axisLabel": "expert", "reverse": False},
                       "cellValues": {"unit": "short"}, "legend": {"show": True}, "showValue": "never",
                       "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
                       "filterValues": {"le": 1e-9}, "exemplars": {"color": "rgba(255,0,255,0.7)"}}}, 12, 10)

    g.row("Streams and recovery")
    g.timeseries("Stream lengths by kind", "Entries in the Redis streams as the balancer samples them "
                 "(`streamoe_stream_length`), summed over partitions, ranks and gateways. Entries every "
                 "reader acked are trimmed each housekeeping tick: a length that grows is a backlog.",
                 [('sum by (kind) (label_replace(max by (stream) (streamoe_stream_length), "kind", "$1", '
                   '"stream", "[{]streamoe:([^:}]+).*"))', "{{kind}}")])
    g.timeseries("Longest streams", "The ten longest streams.",
                 [("topk(10, max by (stream) (streamoe_stream_length))", "{{stream}}")])
    g.timeseries("Messages/s by service", "Stream entries each service handled, by outcome "
                 "(`streamoe_messages_total`).",
                 [(rate("streamoe_messages_total", GATEWAY, "service, outcome"), "{{service}} {{outcome}}")])
    g.timeseries("Recovery events per minute", "Requests the gateways republished, resent or resumed, or "
                 "refused for want of replicas; requests of dead decode instances resumed and work moved from "
                 "dead ranks by the balancer; the notices it acted on; EP groups re-formed; requests aborted "
                 "on the ranks.",
                 [(f"60 * {rate('streamoe_requests_repaired_total', GATEWAY, 'how')}", "repaired: {{how}}"),
                  (f"60 * {rate('streamoe_requests_unreplicated_total', GATEWAY)}", "refused unreplicated"),
                  (f"60 * {rate('streamoe_requests_resumed_total', GATEWAY, 'outcome')}", "resumed: {{outcome}}"),
                  (f"60 * {rate('streamoe_orphaned_requests_moved_total', GATEWAY, 'role')}",
                   "moved from a dead {{role}} rank"),
                  (f"60 * {rate('streamoe_notices_total', GATEWAY, 'kind, role')}", "notice: {{kind}} {{role}}"),
                  (f"60 * {rate('streamoe_ep_reforms_total', ANY_ROLE, 'role, change')}", "EP {{role}}: {{change}}"),
                  (f"60 * {rate('streamoe_requests_aborted_total', ANY_ROLE, 'role')}", "aborted on {{role}}")],
                 w=24)

    g.row("Planner", "The planner (services/planner): the ranks it wants per role, and each change. Empty "
          "where none runs: deploy/compose.yaml has none; `streamoe up --autoscale` and deploy/k8s/autoscale do.")
    g.timeseries("Desired and actual ranks", "`streamoe_planner_desired_ranks` (what KEDA or `streamoe up "
                 "--autoscale` scales to) and `streamoe_planner_actual_ranks` (the ranks reporting load when "
                 "it decided).",
                 [("max by (role) (streamoe_planner_desired_ranks)", "{{role}} desired"),
                  ("max by (role) (streamoe_planner_actual_ranks)", "{{role}} actual")], w=12)
    g.timeseries("Planner decisions", "Changes of the desired ranks by role, direction and reason "
                 "(`streamoe_planner_decisions_total`).",
                 [("sum by (role, direction, reason) (increase(streamoe_planner_decisions_total[$__interval]))",
                   "{{role}} {{direction}} ({{reason}})")], bars=True, interval="1m", w=12)
    return g.panels


def query_variable(name: str, label: str, query: str, include_all: bool = True, sort: int = 1) -> dict:
    return {"type": "query", "name": name, "label": label, "datasource": DS, "definition": query,
            "query": {"query": query, "refId": f"{name}-variable"}, "refresh": 2, "regex": "", "sort": sort,
            "multi": True, "includeAll": include_all, "hide": 0, "options": [],
            **({"allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}
               if include_all else {"current": {}})}


def constant(name: str, value: str, description: str) -> dict:
    return {"type": "constant", "name": name, "label": name, "description": description, "hide": 2,
            "query": value, "current": {"selected": True, "text": value, "value": value},
            "options": [{"selected": True, "text": value, "value": value}]}


def dashboard() -> dict:
    variables = [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus", "regex": "",
         "current": {"selected": False, "text": "Prometheus", "value": DATASOURCE_UID}, "hide": 0, "refresh": 1,
         "options": [], "multi": False, "includeAll": False},
        query_variable("instance", "Instance", 'label_values(up{service!=""}, instance)'),
        query_variable("role", "Role", "label_values(streamoe_kv_blocks_total, role)"),
        # the first layer unless more are picked: DeepSeek-V3 has 58 MoE layers, a heatmap each
        query_variable("layer", "Layer", 'label_values(streamoe_expert_tokens_total{role=~"$role"}, layer)',
                       include_all=False, sort=3),
        *(constant(name, value, description) for name, (value, description) in PRICES.items()),
    ]
    return {
        "uid": "streamoe", "title": "streamoe", "tags": ["streamoe"],
        "description": "A streamoe system live: traffic, latency against the SLO, cost and revenue, the prefix "
                       "cache, the prefill and decode ranks, expert load and EP balance, streams, the planner.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"}, "timezone": "browser", "fiscalYearStartMonth": 0,
        "liveNow": False, "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": variables},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
