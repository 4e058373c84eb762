"""The load generator's speculation figures (loadgen/spec_counters.py): ours and vLLM's counters,
the run's share of them, and a server without /services (vLLM) read at its own /metrics."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadgen import spec_counters

pytestmark = pytest.mark.unit

OURS = """# TYPE streamoe_spec_decode_num_drafts counter
streamoe_spec_decode_num_drafts_total{role="decode",rank="0"} 100.0
streamoe_spec_decode_num_drafts_total{role="decode",rank="1"} 50.0
# TYPE streamoe_spec_decode_num_draft_tokens counter
streamoe_spec_decode_num_draft_tokens_total{role="decode",rank="0"} 200.0
streamoe_spec_decode_num_draft_tokens_total{role="decode",rank="1"} 100.0
# TYPE streamoe_spec_decode_num_accepted_tokens counter
streamoe_spec_decode_num_accepted_tokens_total{role="decode",rank="0"} 120.0
streamoe_spec_decode_num_accepted_tokens_total{role="decode",rank="1"} 30.0
# TYPE streamoe_spec_decode_num_accepted_tokens_per_pos counter
streamoe_spec_decode_num_accepted_tokens_per_pos_total{role="decode",rank="0",position="0"} 80.0
streamoe_spec_decode_num_accepted_tokens_per_pos_total{role="decode",rank="0",position="1"} 40.0
streamoe_spec_decode_num_accepted_tokens_per_pos_total{role="decode",rank="1",position="0"} 30.0
"""

VLLM = """# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 40.0
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 120.0
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 60.0
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 30.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 20.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 10.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""


def test_ours_and_vllms_counters_parse_the_same_way():
    assert spec_counters.parse(OURS) == {"drafts": 150, "draft_tokens": 300, "accepted_tokens": 150,
                                         "pos0": 110, "pos1": 40}
    assert spec_counters.parse(VLLM) == {"drafts": 40, "draft_tokens": 120, "accepted_tokens": 60,
                                         "pos0": 30, "pos1": 20, "pos2": 10}
    assert spec_counters.parse('streamoe_tokens_total{kind="output"} 5.0\n') == {}


def test_the_run_s_share_and_vllm_s_definitions():
    before = {"a": {"drafts": 10, "draft_tokens": 20, "accepted_tokens": 5, "pos0": 4, "pos1": 1},
              "gone": {"drafts": 1000, "draft_tokens": 2000, "accepted_tokens": 0}}
    after = {"a": {"drafts": 110, "draft_tokens": 220, "accepted_tokens": 125, "pos0": 84, "pos1": 41},
             "new": {"drafts": 100, "draft_tokens": 200, "accepted_tokens": 30, "pos0": 30}}
    out = spec_counters.summarize(before, after)
    assert out["spec_decode_num_drafts"] == 200 and out["spec_decode_num_draft_tokens"] == 400
    assert out["spec_decode_acceptance_rate"] == pytest.approx(150 / 400)
    assert out["spec_decode_mean_acceptance_length"] == pytest.approx(1 + 150 / 200)
    assert out["spec_decode_acceptance_rate_per_pos"] == pytest.approx([110 / 200, 40 / 200])
    # a source restarted during the run counts from zero; no drafts or no counters: no figures
    restarted = spec_counters.summarize({"a": {"drafts": 500}}, {"a": {"drafts": 7, "draft_tokens": 7}})
    assert restarted["spec_decode_num_drafts"] == 7
    assert spec_counters.summarize({}, {}) is None
    assert spec_counters.summarize(after, after) is None


def test_a_server_without_services_is_read_at_its_own_metrics():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server hook's name)
            body = VLLM.encode() if self.path == "/metrics" else b"not found"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert spec_counters.metrics_urls(url, 5.0) == [f"{url}/metrics"]
        assert spec_counters.scrape(url) == {f"{url}/metrics": spec_counters.parse(VLLM)}
    finally:
        server.shutdown()
        server.server_close()
    assert spec_counters.scrape("http://127.0.0.1:9") == {}  # nothing listening: no figures, no error
