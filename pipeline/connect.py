"""Connecting to Redis: the configured URL, or the embedded server that ``streamvlm serve`` started.

The embedded server writes its URL to ``{redis.embedded_dir}/url`` so that client commands
(``submit``, ``results``, ``status``, ``cancel``) on the same machine find it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

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


class _RetryUnlessRefused(Retry):
    """Retries lost connections, not a refused login: ``AuthenticationError`` is a ``ConnectionError`` to
    redis-py, but a missing or wrong password does not get better by waiting (retried, and retried again
    inside each reconnect, it took minutes to report)."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # type: ignore[override]
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.AuthenticationError):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def make_client(url: str, retries: int = 8) -> redis.Redis:
    """A client that rides out a Redis restart: reconnects with exponential backoff and jitter (≈ 25 s).

    Credentials and TLS come from the URL: ``redis://:password@host:port/db``, ``redis://user:password@…``,
    ``rediss://…`` for TLS (``?ssl_ca_certs=/path/ca.pem`` to trust a private CA). A refused login fails at once.
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=15,
        retry=_RetryUnlessRefused(ExponentialWithJitterBackoff(cap=5.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def redacted_url(url: str) -> str:
    """``url`` fit to print or log: the password (``:password@`` or ``?password=``) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:***@{parts.netloc.rpartition('@')[2]}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):
        parts = parts._replace(query=urlencode([(n, "***" if n == "password" else v) for n, v in query], safe="/*"))
    # Built by hand: urlunsplit drops the // of a URL with an empty host (unix:///path).
    return (f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


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
