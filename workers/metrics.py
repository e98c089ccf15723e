"""Prometheus metrics and the health endpoint of ``streamvlm serve``.

``GET /metrics``: Prometheus text format. ``GET /health``: JSON ``{"status": "ok"|"degraded", ...}``,
HTTP 200 when Redis answers and the actors are up, 503 otherwise.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("streamvlm_jobs_total", "Jobs that reached a state", ["state"], registry=r)
        self.jobs_running = Gauge("streamvlm_jobs_running", "Jobs running in this process", registry=r)
        self.queue_depth = Gauge("streamvlm_queue_depth", "Entries in the jobs stream (waiting or running)", registry=r)
        self.stage_seconds = Histogram("streamvlm_stage_seconds", "Time per stage per window", ["stage"],
                                       buckets=STAGE_BUCKETS_S, registry=r)
        self.window_seconds = Histogram("streamvlm_window_seconds", "Clip decoded to result stored",
                                        buckets=STAGE_BUCKETS_S, registry=r)
        self.batch_size = Histogram("streamvlm_llm_batch_size", "Requests per LLM batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.windows = Counter("streamvlm_windows_total", "Results stored", registry=r)
        self.visual_tokens_in = Counter("streamvlm_visual_tokens_in_total", "Visual tokens before pruning", registry=r)
        self.visual_tokens_kept = Counter("streamvlm_visual_tokens_kept_total", "Visual tokens after encoder pruning",
                                          registry=r)
        self.flops_saved = Counter("streamvlm_flops_saved_ratio_sum", "Sum over windows of 1 − FLOPs ratio",
                                   registry=r)
        self.dropped_frames = Counter("streamvlm_dropped_frames_total", "Live frames dropped (consumer too slow)",
                                      registry=r)
        self.source_events = Counter("streamvlm_source_events_total", "Live source status events", ["kind"],
                                     registry=r)
        self.redeliveries = Counter("streamvlm_redeliveries_total", "Jobs given back for another attempt", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """/health and /metrics over HTTP, in a daemon thread."""

    def __init__(self, metrics: ServiceMetrics, health: Callable[[], dict], host: str, port: int) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/metrics"):
                    body, ctype, code = outer.metrics.render(), CONTENT_TYPE_LATEST, 200
                elif self.path.startswith("/health"):
                    state = outer.health()
                    body = json.dumps(state).encode()
                    ctype, code = "application/json", 200 if state.get("status") == "ok" else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.metrics = metrics
        self.health = health
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]  # type: ignore[return-value]

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
