// streamoe's live dashboard: polls /dashboard/state and draws it (services/README.md, "Dashboard").
// Plain script, no build step; charts by the vendored uPlot (vendor/README.md). With API keys on the
// gateway, the key is asked once and kept in sessionStorage (this tab only).
(function () {
  "use strict";

  const KEY_STORE = "streamoe.apiKey";
  const POLL_MS = 3000;
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                  "#7f7f7f", "#393b79"];
  const SLO_COLOR = "#d62728";
  const $ = (id) => document.getElementById(id);

  let timer = null;
  const charts = {};  // panel id -> {plot, signature}

  // -- formatting ---------------------------------------------------------------------------------
  const isNum = (v) => typeof v === "number" && isFinite(v);
  function fmt(v, digits) {
    if (!isNum(v)) return "n/a";
    return v.toFixed(digits);
  }
  function usd(v) {
    if (!isNum(v)) return "n/a";
    return "$" + (v === 0 || Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(4));
  }
  const pct = (v) => (isNum(v) ? v * 100 : null);
  const ms = (v) => (isNum(v) ? v * 1000 : null);
  function clock(t) {
    return isNum(t) ? new Date(t * 1000).toLocaleTimeString() : "n/a";
  }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  // -- the panels ---------------------------------------------------------------------------------
  // Each chart panel: series(state) -> [{label, color, scale, digits, dash, pick(point)}]; the
  // stats are numbers beside it: {field (the state's path, for data-field), label, value, text}.
  function latencySeries(metric) {
    return (state) => {
      const out = ["p50", "p95", "p99"].map((q, i) => ({
        label: `${metric.toUpperCase()} ${q} ms`, color: COLORS[i], scale: "ms", digits: 1,
        pick: (p) => ms(p[`${metric}_${q}`]),
      }));
      const bound = state.slo && state.slo[metric];
      if (isNum(bound)) {
        out.push({label: "SLO ms", color: SLO_COLOR, scale: "ms", digits: 1, dash: [6, 4], pick: () => bound * 1000});
      }
      return out;
    };
  }
  function latencyStats(metric) {
    return (state, last) => {
      const out = ["p50", "p95", "p99"].map((q) => ({
        field: `last.${metric}_${q}`, value: last[`${metric}_${q}`], text: fmt(ms(last[`${metric}_${q}`]), 1) + " ms",
        label: q,
      }));
      out.push({field: `slo.${metric}`, value: state.slo && state.slo[metric],
                text: state.slo && isNum(state.slo[metric]) ? fmt(state.slo[metric] * 1000, 0) + " ms" : "none",
                label: "SLO"});
      return out;
    };
  }

  const PANELS = [
    {id: "throughput", title: "Request rate and tokens/s",
     axes: [{scale: "tok", label: "tokens/s"}, {scale: "req", label: "requests/s", side: 1}],
     series: () => [
       {label: "requests/s", color: COLORS[3], scale: "req", digits: 2, pick: (p) => p.requests_per_s},
       {label: "input tok/s", color: COLORS[0], scale: "tok", digits: 1, pick: (p) => p.input_tokens_per_s},
       {label: "output tok/s", color: COLORS[2], scale: "tok", digits: 1, pick: (p) => p.output_tokens_per_s}],
     stats: (state, last) => [
       {field: "last.requests_per_s", value: last.requests_per_s, text: fmt(last.requests_per_s, 2), label: "req/s"},
       {field: "last.input_tokens_per_s", value: last.input_tokens_per_s, text: fmt(last.input_tokens_per_s, 1),
        label: "input tok/s"},
       {field: "last.output_tokens_per_s", value: last.output_tokens_per_s, text: fmt(last.output_tokens_per_s, 1),
        label: "output tok/s"}]},
    {id: "queue", title: "Requests running and waiting",
     axes: [{scale: "n", label: "requests"}],
     series: () => [
       {label: "running", color: COLORS[0], scale: "n", digits: 0, pick: (p) => p.running},
       {label: "waiting", color: COLORS[1], scale: "n", digits: 0, pick: (p) => p.waiting},
       {label: "in flight (gateways)", color: COLORS[8], scale: "n", digits: 0, pick: (p) => p.inflight}],
     stats: (state, last) => [
       {field: "last.running", value: last.running, text: fmt(last.running, 0), label: "running"},
       {field: "last.waiting", value: last.waiting, text: fmt(last.waiting, 0), label: "waiting"}]},
    {id: "ttft", title: "Time to first token", axes: [{scale: "ms", label: "ms"}],
     series: latencySeries("ttft"), stats: latencyStats("ttft")},
    {id: "itl", title: "Inter-token latency", axes: [{scale: "ms", label: "ms"}],
     series: latencySeries("itl"), stats: latencyStats("itl")},
    {id: "slo", title: "SLO attainment (share within the bound, per interval)", axes: [{scale: "%", label: "%"}],
     series: (state) => Object.keys(state.slo || {}).map((m, i) => ({
       label: `${m} %`, color: COLORS[i], scale: "%", digits: 1, pick: (p) => pct(p[`${m}_slo_attainment`])})),
     stats: (state) => Object.keys(state.slo || {}).map((m) => {
       const v = state.window ? state.window[`${m}_slo_attainment`] : null;
       return {field: `window.${m}_slo_attainment`, value: v, text: fmt(pct(v), 1) + " %",
               label: `${m} over the window`};
     })},
    {id: "kv", title: "KV cache usage per decode rank", axes: [{scale: "%", label: "% of blocks"}],
     series: (state) => decodeRanks(state).map((r, i) => ({
       label: `decode ${r} %`, color: COLORS[i % COLORS.length], scale: "%", digits: 1,
       pick: (p) => pct((p.kv_usage || {})[r])})),
     stats: (state, last) => decodeRanks(state).map((r) => ({
       field: `last.kv_usage.${r}`, value: (last.kv_usage || {})[r], text: fmt(pct((last.kv_usage || {})[r]), 1) + " %",
       label: `decode ${r}`})),
     note: (state, last) => (Object.keys(last.kv_usage || {}).length ? "" : "n/a: no decode rank answers")},
    {id: "cache", title: "Prefix cache", axes: [{scale: "tok", label: "cached tokens/s"}, {scale: "%", label: "hit %", side: 1}],
     series: () => [
       {label: "hit rate %", color: COLORS[0], scale: "%", digits: 1, pick: (p) => pct(p.prefix_hit_rate)},
       {label: "cached tok/s", color: COLORS[2], scale: "tok", digits: 1, pick: (p) => p.cached_tokens_per_s}],
     stats: (state, last) => [
       {field: "last.prefix_hit_rate", value: last.prefix_hit_rate, text: fmt(pct(last.prefix_hit_rate), 1) + " %",
        label: "hit rate"},
       {field: "last.cached_tokens_per_s", value: last.cached_tokens_per_s, text: fmt(last.cached_tokens_per_s, 1),
        label: "cached tok/s"},
       {field: "cost.cache_hit_rate", value: state.cost && state.cost.cache_hit_rate,
        text: fmt(pct(state.cost && state.cost.cache_hit_rate), 1) + " %", label: "all time"}]},
    {id: "cost", title: "Cost, theoretical revenue and margin (streamoe cost)", axes: [{scale: "$", label: "USD"}],
     series: () => [
       {label: "cost $", color: SLO_COLOR, scale: "$", digits: 4, pick: (p) => p.cost_usd},
       {label: "revenue $", color: COLORS[2], scale: "$", digits: 4, pick: (p) => p.revenue_usd}],
     stats: (state) => {
       const c = state.cost || {};
       return [
         {field: "cost.cost_usd", value: c.cost_usd, text: usd(c.cost_usd), label: "cost"},
         {field: "cost.revenue_usd", value: c.revenue_usd, text: usd(c.revenue_usd), label: "revenue"},
         {field: "cost.margin_pct", value: c.margin_pct, text: fmt(c.margin_pct, 1) + " %", label: "margin"},
         {field: "cost.gpu_hours", value: c.gpu_hours, text: fmt(c.gpu_hours, 4), label: "GPU-hours"},
         {field: "cost.output_tokens", value: c.output_tokens, text: fmt(c.output_tokens, 0), label: "output tokens"}];
     },
     note: (state) => (state.cost ? "" : "n/a: no usage counted yet")},
    {id: "spec", title: "Speculative decoding acceptance", axes: [{scale: "%", label: "% of draft tokens"}],
     series: () => [{label: "accepted %", color: COLORS[4], scale: "%", digits: 1, pick: (p) => pct(p.spec_acceptance)}],
     stats: (state) => {
       const w = state.window || {};
       return [{field: "window.spec_acceptance", value: w.spec_acceptance, text: fmt(pct(w.spec_acceptance), 1) + " %",
                label: "over the window"},
               {field: "window.spec_mean_acceptance_length", value: w.spec_mean_acceptance_length,
                text: fmt(w.spec_mean_acceptance_length, 2), label: "mean acceptance length"}];
     },
     note: (state) => ((state.history || []).some((p) => isNum(p.spec_acceptance)) ? ""
       : "n/a: no rank speculates (or no draft in the window)")},
    {id: "planner", title: "Planner: desired and actual ranks", axes: [{scale: "n", label: "ranks"}],
     series: (state) => plannerRoles(state).flatMap((role, i) => [
       {label: `${role} desired`, color: COLORS[i * 2], scale: "n", digits: 0,
        pick: (p) => (p.planner && p.planner[role] ? p.planner[role].desired : null)},
       {label: `${role} actual`, color: COLORS[i * 2 + 1], scale: "n", digits: 0, dash: [4, 3],
        pick: (p) => (p.planner && p.planner[role] ? p.planner[role].actual : null)}]),
     stats: () => [],
     note: (state) => (state.planner || plannerRoles(state).length ? "" : "n/a: no planner runs"),
     extra: plannerTable},
  ];

  function decodeRanks(state) {
    const seen = new Set();
    for (const p of state.history || []) Object.keys(p.kv_usage || {}).forEach((r) => seen.add(r));
    return [...seen];
  }
  function plannerRoles(state) {
    const seen = new Set();
    for (const p of state.history || []) Object.keys(p.planner || {}).forEach((r) => seen.add(r));
    return [...seen].sort();
  }

  // -- charts -------------------------------------------------------------------------------------
  function chartWidth(panel) {
    return Math.max(280, panel.clientWidth - 24);
  }
  function keepLatestInLegend(u) {
    // the legend shows the newest values whenever the cursor is off the chart
    if (u.legend.idx == null && u.data[0].length) u.setLegend({idx: u.data[0].length - 1}, false);
  }
  function makeChart(spec, series, data, panel, holder) {
    const scales = {x: {time: true}};
    for (const s of series) scales[s.scale] = scales[s.scale] || {auto: true};
    if (scales["%"]) scales["%"] = {auto: false, range: [0, 100]};
    // the time axis as wall-clock time alone (uPlot's default adds a date line that crowds a narrow chart)
    const axes = [{space: 70, values: (u, splits) => splits.map((v) => new Date(v * 1000).toLocaleTimeString(
      [], {hour: "2-digit", minute: "2-digit", second: "2-digit"}))}].concat((spec.axes || []).filter((a) => scales[a.scale]).map((a) => ({
      scale: a.scale, label: a.label, side: a.side === 1 ? 1 : 3, grid: {show: a.side !== 1}, size: 56})));
    const opts = {
      width: chartWidth(panel), height: 190,
      cursor: {drag: {x: false, y: false}},
      legend: {live: true},
      scales, axes,
      series: [{value: (u, v) => clock(v)}].concat(series.map((s) => ({
        label: s.label, stroke: s.color, width: 2, dash: s.dash, scale: s.scale, spanGaps: false,
        value: (u, v) => fmt(v, s.digits),
      }))),
      hooks: {setLegend: [keepLatestInLegend], ready: [keepLatestInLegend]},
    };
    return new uPlot(opts, data, holder);
  }
  function drawChart(spec, state, panel) {
    const series = spec.series(state);
    const history = state.history || [];
    const data = [history.map((p) => p.t)].concat(series.map((s) => history.map((p) => {
      const v = s.pick(p);
      return isNum(v) ? v : null;
    })));
    const holder = panel.querySelector(".chart");
    const signature = series.map((s) => s.label).join("|");
    const known = charts[spec.id];
    if (!series.length) {
      if (known) known.plot.destroy();
      delete charts[spec.id];
      holder.replaceChildren();
      return;
    }
    if (known && known.signature === signature) {
      known.plot.setData(data);
    } else {
      if (known) known.plot.destroy();
      holder.replaceChildren();
      charts[spec.id] = {plot: makeChart(spec, series, data, panel, holder), signature};
    }
    const plot = charts[spec.id].plot;
    if (data[0].length) plot.setLegend({idx: data[0].length - 1}, false);
  }

  // -- the other panels: heatmap, tables ----------------------------------------------------------
  function heatColor(x) {
    // white -> deep blue, on the share of the hottest cell
    const a = [247, 251, 255], b = [8, 48, 107];
    const c = a.map((v, i) => Math.round(v + (b[i] - v) * Math.sqrt(x)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }
  function drawHeatmap(group, width) {
    const layers = group.layers.length, experts = group.experts;
    const left = 34, cellW = Math.max(2, Math.floor((width - left) / Math.max(experts, 1)));
    const cellH = Math.max(8, Math.min(20, Math.floor(180 / Math.max(layers, 1))));
    const canvas = el("canvas", {"data-group": `${group.role}/${group.group}`, "data-total": String(group.total)});
    canvas.width = left + cellW * experts;
    canvas.height = cellH * layers + 14;
    const ctx = canvas.getContext("2d");
    let max = 0;
    for (const row of group.tokens) for (const v of row) max = Math.max(max, v);
    ctx.font = "10px sans-serif";
    ctx.fillStyle = "#4a5568";
    group.tokens.forEach((row, i) => {
      ctx.fillStyle = "#4a5568";
      ctx.fillText(`L${group.layers[i]}`, 2, i * cellH + cellH - 2);
      row.forEach((v, e) => {
        ctx.fillStyle = max > 0 ? heatColor(v / max) : "#f2f2f2";
        ctx.fillRect(left + e * cellW, i * cellH, cellW - (cellW > 3 ? 1 : 0), cellH - 1);
      });
    });
    ctx.fillStyle = "#4a5568";
    ctx.fillText("expert 0", left, layers * cellH + 11);
    ctx.fillText(String(experts - 1), left + (experts - 1) * cellW, layers * cellH + 11);
    return canvas;
  }
  function statNode(s) {
    const node = el("span", {class: "stat", "data-field": s.field}, el("b", {text: s.text}), " " + s.label);
    node.dataset.value = isNum(s.value) ? String(s.value) : "";
    return node;
  }
  function drawExperts(state, panel) {
    const body = panel.querySelector(".body");
    body.replaceChildren();
    const groups = state.experts || [];
    if (!groups.length) {
      body.append(el("p", {class: "note", text: "n/a: no expert load reported (no worker answers, or no MoE layer ran)"}));
      return;
    }
    for (const g of groups) {
      const when = g.placement_version == null ? "none published"
        : `v${g.placement_version}, ` + (isNum(g.rebalanced_at) ? `at ${clock(g.rebalanced_at)}` : "before this gateway started")
          + ` (max/mean ${fmt(g.max_mean_before, 3)} → ${fmt(g.max_mean_after, 3)})`;
      const key = `${g.role}/${g.group}`;
      body.append(el("div", {class: "heat"},
        el("h3", {text: `${key}: ${fmt(g.total, 0)} tokens routed in the window`}),
        el("div", {class: "stats"},
          statNode({field: `experts.${key}.expert_max_mean`, value: g.expert_max_mean, text: fmt(g.expert_max_mean, 3),
                    label: "expert max/mean"}),
          statNode({field: `experts.${key}.rank_max_mean`, value: g.rank_max_mean,
                    text: g.ep_size ? fmt(g.rank_max_mean, 3) : "n/a", label: g.ep_size ? `EPLB imbalance (rank max/mean, EP ${g.ep_size})` : "EPLB imbalance (no EP group)"}),
          el("span", {class: "stat", "data-field": `experts.${key}.placement_version`}, "last rebalance: ", el("b", {text: when}))),
        drawHeatmap(g, chartWidth(panel))));
    }
  }
  function table(headers, rows) {
    const head = el("tr", {}, ...headers.map((h) => el("th", {class: h.num ? "num" : "", text: h.label})));
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows.map((cells) =>
      el("tr", {}, ...cells.map((c, i) => {
        const td = el("td", {class: (headers[i].num ? "num " : "") + (c.cls || "")});
        td.textContent = c.text == null ? "n/a" : String(c.text);
        if (c.cls === "na" || c.text == null) td.classList.add("na");
        return td;
      })))));
  }
  function drawServices(state, panel) {
    const body = panel.querySelector(".body");
    const rows = (state.services || []).map((s) => [
      {text: s.name}, {text: s.rank == null ? "" : (s.group && s.group !== s.name ? `${s.group}/${s.rank}` : s.rank)},
      {text: s.status, cls: s.status},
      {text: s.restarts == null ? "n/a" : s.restarts, cls: s.restarts == null ? "na" : ""},
      {text: s.instance_id}, {text: s.detail || "", cls: "detail"}]);
    const parts = [table([{label: "service"}, {label: "rank"}, {label: "status"}, {label: "restarts", num: true},
                          {label: "instance"}, {label: ""}], rows)];
    const up = (state.services || []).filter((s) => s.status !== "down").length;
    const down = (state.services || []).length - up;
    panel.querySelector(".stats").replaceChildren(
      statNode({field: "services.up", value: up, text: String(up), label: "up"}),
      statNode({field: "services.down", value: down, text: String(down), label: "down"}),
      el("span", {class: "stat"}, "restarts: ", el("b", {text: state.supervisor ? "from streamoe up" : "n/a (not run by streamoe up)"})));
    if ((state.ep_members || []).length) {
      parts.push(el("h3", {text: "EP groups"}), table(
        [{label: "role"}, {label: "group"}, {label: "rank", num: true}, {label: "members", num: true}],
        state.ep_members.map((m) => [{text: m.role}, {text: m.group}, {text: m.rank}, {text: m.members}])));
    }
    body.replaceChildren(...parts);
  }
  function drawStreams(state, panel) {
    const body = panel.querySelector(".body");
    if (!state.streams) {
      body.replaceChildren(el("p", {class: "note", text: "n/a: Redis did not answer"}));
      return;
    }
    const rows = state.streams.map((s) => [
      {text: s.stream}, {text: s.group || "(no group)"}, {text: s.length},
      {text: s.pending}, {text: s.lag == null ? "n/a" : s.lag, cls: s.lag == null ? "na" : ""}]);
    body.replaceChildren(
      state.lag_supported ? "" : el("p", {class: "note", text: "lag: n/a (this Redis does not report a group's lag; 7.0 does)"}),
      table([{label: "stream"}, {label: "consumer group"}, {label: "length", num: true}, {label: "pending", num: true},
             {label: "lag", num: true}], rows));
  }
  function plannerTable(state, panel) {
    const body = panel.querySelector(".body");
    const d = state.planner;
    if (!d) {
      body.replaceChildren();
      return;
    }
    const keys = ["seq", "time", "prefill", "prefill_actual", "prefill_reason", "decode", "decode_actual", "decode_reason",
                  "input_tok_s", "output_tok_s", "ttft_p90_ms", "itl_p90_ms"].filter((k) => k in d);
    body.replaceChildren(el("h3", {text: "last decision"}), table([{label: "field"}, {label: "value"}],
      keys.map((k) => [{text: k}, {text: k === "time" ? clock(d[k]) : (isNum(d[k]) ? +d[k].toFixed(2) : d[k])}])));
  }

  // -- the page -----------------------------------------------------------------------------------
  function buildPanels() {
    const main = $("panels");
    if (main.childElementCount) return;
    for (const spec of PANELS) {
      main.append(el("section", {class: "panel", id: `panel-${spec.id}`},
        el("h2", {text: spec.title}), el("div", {class: "stats"}), el("p", {class: "note"}),
        el("div", {class: "chart"}), el("div", {class: "body"})));
    }
    for (const [id, title] of [["experts", "Expert load per layer (tokens routed in the window) and EPLB"],
                               ["services", "Services"], ["streams", "Redis streams: length, pending, lag"]]) {
      main.append(el("section", {class: "panel wide", id: `panel-${id}`},
        el("h2", {text: title}), el("div", {class: "stats"}), el("div", {class: "body"})));
    }
  }
  function render(state) {
    $("key-form").hidden = true;
    const main = $("panels");
    main.hidden = false;
    buildPanels();
    const history = state.history || [];
    const last = history.length ? history[history.length - 1] : {};
    document.body.dataset.sampleT = isNum(last.t) ? String(last.t) : "";
    document.body.dataset.samples = String(history.length);
    for (const spec of PANELS) {
      const panel = $(`panel-${spec.id}`);
      panel.querySelector(".stats").replaceChildren(...spec.stats(state, last).map(statNode));
      panel.querySelector(".note").textContent = history.length ? (spec.note ? spec.note(state, last) : "")
        : "collecting: the first samples come within a few seconds";
      drawChart(spec, state, panel);
      if (spec.extra) spec.extra(state, panel);
    }
    drawExperts(state, $("panel-experts"));
    drawServices(state, $("panel-services"));
    drawStreams(state, $("panel-streams"));
    const errors = state.errors || [];
    $("errors").hidden = !errors.length;
    $("errors").replaceChildren(...errors.map((e) => el("div", {text: e})));
    const down = (state.services || []).filter((s) => s.status === "down").map((s) => s.name);
    setStatus(`updated ${clock(state.last_sample)} · ${history.length} samples every ${state.interval_s} s` +
              (down.length ? ` · down: ${down.join(", ")}` : ""), down.length ? "down" : "");
  }
  function setStatus(text, cls) {
    const status = $("status");
    status.textContent = text;
    status.className = "status " + (cls || "");
  }

  // -- polling and the key ------------------------------------------------------------------------
  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }
  function askKey(message) {
    clearTimeout(timer);
    $("panels").hidden = true;
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    $("key-input").focus();
    setStatus("an API key is needed", "down");
  }
  async function poll() {
    const key = sessionStorage.getItem(KEY_STORE);
    $("forget-key").hidden = !key;
    let response;
    try {
      response = await fetch("/dashboard/state", {headers: key ? {Authorization: `Bearer ${key}`} : {}, cache: "no-store"});
    } catch (e) {
      setStatus(`gateway unreachable (${e.message}); retrying`, "down");
      schedule();
      return;
    }
    if (response.status === 401) {
      let why = "";
      try {
        why = (await response.json()).error.message;
      } catch (e) { /* not OpenAI's shape: the status says enough */ }
      if (key) sessionStorage.removeItem(KEY_STORE);
      askKey(key ? `The key was refused (401: ${why || "unauthorized"}).` : "");
      return;
    }
    if (!response.ok) {
      setStatus(`/dashboard/state answered ${response.status}; retrying`, "down");
      schedule();
      return;
    }
    try {
      render(await response.json());
    } catch (e) {
      setStatus(`could not draw the state: ${e.message}`, "down");
      throw e;
    } finally {
      schedule();
    }
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) {
      $("key-error").textContent = "Enter a key.";
      return;
    }
    sessionStorage.setItem(KEY_STORE, key);
    $("key-input").value = "";
    $("key-error").textContent = "";
    poll();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    location.reload();
  });
  window.addEventListener("resize", () => {
    for (const [id, c] of Object.entries(charts)) c.plot.setSize({width: chartWidth($(`panel-${id}`)), height: 190});
  });
  poll();
})();
