"""Connecting to Redis: the configured URL, or the embedded server that ``streamvlm serve`` started.

The embedded server writes its URL to ``{redis.embedded_dir}/url`` so that client commands
(``submit``, ``results``, ``status``, ``cancel``) on the same machine find it.
"""

from __future__ import annotations

from pathlib import Path

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from pipeline.keys import RedisKeys
from pipeline.queue import JobQueue
from pipeline.redis_server import EmbeddedRedis
from pipeline.settings import Settings

URL_FILE = "url"


class RedisUnavailable(RuntimeError):
    """No Redis to talk to: none configured and no embedded server running."""


def make_client(url: str, retries: int = 8) -> redis.Redis:
    """A client that rides out a Redis restart: reconnects with exponential backoff and jitter (≈ 25 s)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(cap=5.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _embedded_url_file(settings: Settings) -> Path:
    return Path(settings.redis.embedded_dir) / URL_FILE


def client_url(settings: Settings) -> str:
    """The Redis URL client commands use: ``redis.url``, else the running embedded server's."""
    if settings.redis.url is not None:
        return settings.redis.url.get_secret_value()
    url_file = _embedded_url_file(settings)
    if url_file.is_file():
        url = url_file.read_text().strip()
        probe = redis.Redis.from_url(url, socket_connect_timeout=1)
        try:
            probe.ping()
            return url
        except redis.ConnectionError:
            pass
        finally:
            probe.close()
    raise RedisUnavailable(
        "no Redis to talk to: set redis.url (STREAMVLM_REDIS__URL) or start `streamvlm serve`, "
        f"which starts an embedded Redis and records its address in {url_file}"
    )


def start_embedded(settings: Settings) -> EmbeddedRedis | None:
    """For ``serve`` with no ``redis.url``: reuse a running embedded server, else start one. None if reused."""
    try:
        client_url(settings)
        return None
    except RedisUnavailable:
        pass
    server = EmbeddedRedis(Path(settings.redis.embedded_dir)).start()
    _embedded_url_file(settings).write_text(server.url + "\n")
    return server


def job_queue(settings: Settings, client: redis.Redis, consumer: str) -> JobQueue:
    q = settings.queue
    return JobQueue(
        client,
        consumer,
        RedisKeys(settings.redis.key_prefix),
        lease_s=q.lease_s,
        max_deliveries=q.max_deliveries,
        results_ttl_s=q.results_ttl_s,
        stream_maxlen=q.stream_maxlen,
    )
