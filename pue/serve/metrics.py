"""Prometheus metrics of one server (its own registry: no global state, two apps in one process never mix)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/v1/embeddings", "/v1/models", "/health", "/metrics")
STAGES = ("validate", "queue", "inference", "encode", "request")
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Requests by route and status, rows by kind, queue depth, batch sizes, and seconds per stage.

    Stages: `validate` (parse, decode images, tokenize), `queue` (waiting for a batch), `inference` (one runtime
    batch), `encode` (the response body), `request` (the whole embeddings request).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pue_serve_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.rows = Counter("pue_serve_rows", "Rows embedded, by kind", ["kind"], registry=self.registry)
        self.queue_rows = Gauge("pue_serve_queue_rows", "Rows waiting for a batch", registry=self.registry)
        self.batch_size = Histogram(
            "pue_serve_batch_size", "Rows per runtime batch", buckets=_BATCH_SIZES, registry=self.registry
        )
        self.stage_seconds = Histogram(
            "pue_serve_stage_seconds", "Seconds per stage", ["stage"], buckets=_SECONDS, registry=self.registry
        )

    @staticmethod
    def route_label(path: str) -> str:
        """The route a path belongs to (bounded label values: anything else is `other`)."""
        if path.startswith("/v1/models"):
            return "/v1/models"
        return path if path in ROUTES else "other"

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
