"""Per-tenant rate and concurrency limits, in memory, checked with the key before the body is read.

Requests and tokens per minute are token buckets (capacity = the per-minute limit, refilled continuously),
as OpenAI's limits behave: a burst up to the limit passes, then requests pass at the refill rate. A request
takes one request token when it is admitted; tokens (prompt + completion) are charged when it ends, since
only then are they known, and a tenant whose token bucket is empty is refused until it has refilled.
Concurrent requests are counted from admission until the response has been sent.

The answers carry OpenAI's headers (x-ratelimit-limit-*, -remaining-*, -reset-*) so clients that pace
themselves by them work unmodified; a refusal is 429 with Retry-After.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from server.tenants.store import Limits


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '250ms'."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    seconds = math.ceil(seconds)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


class _Bucket:
    __slots__ = ("capacity", "level", "stamp")

    def __init__(self, capacity: int, now: float):
        self.capacity, self.level, self.stamp = capacity, float(capacity), now

    def refill(self, capacity: int, now: float) -> None:
        if capacity != self.capacity:  # the limit changed: keep what was used
            self.level = min(capacity, self.level + capacity - self.capacity)
            self.capacity = capacity
        self.level = min(capacity, self.level + (now - self.stamp) * capacity / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds `amount`."""
        return max(0.0, (amount - self.level) * 60.0 / self.capacity) if self.capacity else math.inf

    def until_full(self) -> float:
        return self.wait_for(self.capacity)


@dataclass
class Verdict:
    """A limit check: refused (with the message and Retry-After) or not, and the headers to send either way."""

    headers: list[tuple[bytes, bytes]]
    refused: str | None = None
    retry_after: int = 0


class TenantLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}
        self._active: dict[str, int] = {}

    def admit(self, tenant_id: str, limits: Limits, now: float | None = None) -> Verdict:
        """Check and, if admitted, take a request and a concurrency slot (give it back with release())."""
        now = time.monotonic() if now is None else now
        headers: list[tuple[bytes, bytes]] = []
        refused, retry = None, 0.0
        with self._lock:
            requests = tokens = None
            if limits.requests_per_minute is not None:
                requests = self._bucket(self._requests, tenant_id, limits.requests_per_minute, now)
                if requests.level < 1:
                    refused = f"Rate limit reached: {limits.requests_per_minute} requests per minute."
                    retry = requests.wait_for(1)
            if limits.tokens_per_minute is not None:
                tokens = self._bucket(self._tokens, tenant_id, limits.tokens_per_minute, now)
                if refused is None and tokens.level <= 0:
                    refused = f"Rate limit reached: {limits.tokens_per_minute} tokens per minute."
                    retry = tokens.wait_for(1)
            active = self._active.get(tenant_id, 0)
            if refused is None and limits.max_concurrent is not None and active >= limits.max_concurrent:
                refused = f"Too many concurrent requests: at most {limits.max_concurrent} at once for this tenant."
                retry = 1.0
            if refused is None:
                self._active[tenant_id] = active + 1
                if requests is not None:
                    requests.level -= 1
            if requests is not None:
                headers += [(b"x-ratelimit-limit-requests", str(requests.capacity).encode()),
                            (b"x-ratelimit-remaining-requests", str(max(0, int(requests.level))).encode()),
                            (b"x-ratelimit-reset-requests", _duration(requests.until_full()).encode())]
            if tokens is not None:
                headers += [(b"x-ratelimit-limit-tokens", str(tokens.capacity).encode()),
                            (b"x-ratelimit-remaining-tokens", str(max(0, int(tokens.level))).encode()),
                            (b"x-ratelimit-reset-tokens", _duration(tokens.until_full()).encode())]
        if refused is not None:
            return Verdict(headers, refused, max(1, math.ceil(retry)))
        return Verdict(headers)

    def release(self, tenant_id: str) -> None:
        with self._lock:
            left = self._active.get(tenant_id, 0) - 1
            if left > 0:
                self._active[tenant_id] = left
            else:
                self._active.pop(tenant_id, None)

    def charge_tokens(self, tenant_id: str, limits: Limits, count: int, now: float | None = None) -> None:
        if limits.tokens_per_minute is None or count <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            self._bucket(self._tokens, tenant_id, limits.tokens_per_minute, now).level -= count

    def active(self, tenant_id: str) -> int:
        with self._lock:
            return self._active.get(tenant_id, 0)

    @staticmethod
    def _bucket(buckets: dict[str, _Bucket], tenant_id: str, capacity: int, now: float) -> _Bucket:
        bucket = buckets.get(tenant_id)
        if bucket is None:
            bucket = buckets[tenant_id] = _Bucket(capacity, now)
        else:
            bucket.refill(capacity, now)
        return bucket
