"""Tenants, their keys, limits and daily usage in one SQLite file under data_dir (`tenants.sqlite3`).

SQLite (the standard library's sqlite3) because it is the embedded default: one file beside the adapter
store, transactions, and a second process (the `loraplex tenants` command line) may write while the
server reads (WAL mode), so a key revoked from the command line is refused on the server's next request.

A key is `lpx-<key id>-<secret>`: the id (12 hex digits) is public and indexes the row; the secret (32
random bytes) is stored only as a salted scrypt hash. scrypt costs ~75 ms here, far too much for every
request, so the first request with a key verifies it once and keeps a SHA-256 digest of the whole key in
memory; later requests compare that digest (hmac.compare_digest) and read the key's row, so a revocation,
wherever it was made, applies to the next request (Performance: authentication + limit check p99).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

log = logging.getLogger("loraplex.tenants")
DB_FILE = "tenants.sqlite3"
KEY_PATTERN = re.compile(r"^lpx-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")
SCRYPT = dict(n=2**14, r=8, p=1, dklen=32)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_VERIFIED = 100_000  # digests of verified keys kept in memory; past this the cache starts over

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL, limits TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(id), salt BLOB NOT NULL, hash BLOB NOT NULL,
    created_at INTEGER NOT NULL, revoked_at INTEGER, name TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS keys_by_tenant ON keys(tenant_id);
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, tenant_id TEXT NOT NULL, expert TEXT NOT NULL, requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, PRIMARY KEY (day, tenant_id, expert));
"""


class TenantError(Exception):
    """A refusal of a tenant or key operation: status, message, param (answered as it is at the edge)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; None: unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion
    max_concurrent: int | None = None  # requests in flight at once
    max_experts: int | None = None  # experts and mixtures it owns
    max_expert_bytes: int | None = None  # bytes of its experts' weights in the store
    max_file_bytes: int | None = None  # bytes of its training files

    @classmethod
    def parse(cls, value: dict | None, param: str = "limits") -> "Limits":
        value = value or {}
        if not isinstance(value, dict):
            raise TenantError(400, "limits must be an object", param)
        names = {f.name for f in fields(cls)}
        for key, number in value.items():
            if key not in names:
                raise TenantError(400, f"unknown limit '{key}'; the limits are {', '.join(sorted(names))}",
                                  f"{param}.{key}")
            if number is not None and (not isinstance(number, int) or isinstance(number, bool) or number < 0):
                raise TenantError(400, f"{key} must be a whole number >= 0, or null (unlimited)", f"{param}.{key}")
        return cls(**value)


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created_at: int
    limits: Limits

    def public(self) -> dict:
        return {"id": self.id, "object": "tenant", "name": self.name, "created_at": self.created_at,
                "limits": asdict(self.limits)}


@dataclass(frozen=True)
class KeyHolder:
    """What a valid key resolves to."""

    key_id: str
    tenant: Tenant


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def today(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now if now is not None else time.time()))


class TenantStore:
    """The database. Thread-safe: one connection, one lock (every statement is short)."""

    def __init__(self, data_dir: str | Path):
        path = Path(data_dir) / DB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._verified: dict[str, bytes] = {}  # key id -> SHA-256 of the whole key, once scrypt said yes
        # one scrypt at a time: wrong secrets sent for a real key id cost one core at most, never all of them
        self._slow_checks = threading.Semaphore(1)
        self._pending_usage: dict[tuple[str, str, str], list[int]] = {}
        self._usage_lock = threading.Lock()
        self._closed = threading.Event()

    def start_flushing(self, every_s: float = 1.0) -> None:
        """Write counted usage to the database every `every_s` seconds, in a thread of its own (a serving
        process; the command line reads and writes directly)."""
        def flush_forever():
            while not self._closed.wait(every_s):
                try:
                    self.flush_usage()
                except sqlite3.Error:
                    log.exception("writing usage failed; retried at the next flush")

        threading.Thread(target=flush_forever, name="loraplex-usage", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.flush_usage()
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def any_tenant(self) -> bool:
        return bool(self._rows("SELECT 1 FROM tenants LIMIT 1"))

    # ---- tenants -------------------------------------------------------------------------------

    def create_tenant(self, name: str, limits: Limits = Limits()) -> Tenant:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise TenantError(400, "a tenant's name is 1-64 of [A-Za-z0-9._-], starting with a letter or digit",
                              "name")
        tenant = Tenant(f"tn-{secrets.token_hex(6)}", name, int(time.time()), limits)
        try:
            with self._lock:
                self._db.execute("INSERT INTO tenants VALUES (?, ?, ?, ?)",
                                 (tenant.id, name, tenant.created_at, json.dumps(asdict(limits))))
        except sqlite3.IntegrityError:
            raise TenantError(409, f"A tenant named '{name}' exists already.", "name", "tenant_exists") from None
        return tenant

    @staticmethod
    def _tenant(row) -> Tenant:
        return Tenant(row[0], row[1], row[2], Limits(**json.loads(row[3])))

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        rows = self._rows("SELECT id, name, created_at, limits FROM tenants WHERE id = ? OR name = ?",
                          (tenant_id, tenant_id))
        return self._tenant(rows[0]) if rows else None

    def tenant(self, tenant_id: str) -> Tenant:
        found = self.get_tenant(tenant_id)
        if found is None:
            raise TenantError(404, f"No tenant '{tenant_id}'.", "tenant_id", "tenant_not_found")
        return found

    def list_tenants(self) -> list[Tenant]:
        return [self._tenant(r) for r in self._rows("SELECT id, name, created_at, limits FROM tenants ORDER BY created_at, id")]

    def set_limits(self, tenant_id: str, limits: Limits) -> Tenant:
        tenant = self.tenant(tenant_id)
        with self._lock:
            self._db.execute("UPDATE tenants SET limits = ? WHERE id = ?", (json.dumps(asdict(limits)), tenant.id))
        return self.tenant(tenant.id)

    # ---- keys ----------------------------------------------------------------------------------

    def issue_key(self, tenant_id: str, name: str = "") -> tuple[dict, str]:
        """(the key's public record, the key itself: shown this once, never stored)."""
        tenant = self.tenant(tenant_id)
        key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), os.urandom(16)
        created = int(time.time())
        with self._lock:
            self._db.execute("INSERT INTO keys (id, tenant_id, salt, hash, created_at, name) VALUES (?, ?, ?, ?, ?, ?)",
                             (key_id, tenant.id, salt, _hash(secret, salt), created, str(name)[:64]))
        record = {"id": key_id, "object": "tenant.key", "tenant_id": tenant.id, "name": str(name)[:64],
                  "created_at": created, "revoked_at": None}
        return record, f"lpx-{key_id}-{secret}"

    def list_keys(self, tenant_id: str) -> list[dict]:
        tenant = self.tenant(tenant_id)
        rows = self._rows("SELECT id, name, created_at, revoked_at FROM keys WHERE tenant_id = ? ORDER BY created_at, id",
                          (tenant.id,))
        return [{"id": r[0], "object": "tenant.key", "tenant_id": tenant.id, "name": r[1], "created_at": r[2],
                 "revoked_at": r[3]} for r in rows]

    def revoke_key(self, tenant_id: str, key_id: str) -> dict:
        tenant = self.tenant(tenant_id)
        with self._lock:
            done = self._db.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND tenant_id = ? AND revoked_at IS NULL",
                                    (int(time.time()), key_id, tenant.id)).rowcount
        self._verified.pop(key_id, None)
        if not done and not any(k["id"] == key_id for k in self.list_keys(tenant.id)):
            raise TenantError(404, f"No key '{key_id}' for tenant '{tenant_id}'.", "key_id", "key_not_found")
        return next(k for k in self.list_keys(tenant.id) if k["id"] == key_id)

    def rotate_key(self, tenant_id: str, key_id: str) -> tuple[dict, str]:
        """A new key for the tenant (same name), and the old one revoked: (the new key's record, the new key)."""
        old = self.revoke_key(tenant_id, key_id)
        return self.issue_key(tenant_id, old["name"])

    def authenticate(self, token: str) -> KeyHolder | None:
        """The tenant of a valid, unrevoked key; None otherwise. Fast once a key has been seen (see the module
        docstring); the first time a key is seen this runs scrypt (~75 ms): call it off the event loop then
        (`needs_slow_check`)."""
        match = KEY_PATTERN.match(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        rows = self._rows("SELECT k.salt, k.hash, k.revoked_at, t.id, t.name, t.created_at, t.limits FROM keys k "
                          "JOIN tenants t ON t.id = k.tenant_id WHERE k.id = ?", (key_id,))
        if not rows or rows[0][2] is not None:
            return None
        salt, stored, _, *tenant_row = rows[0]
        digest, known = _digest(token), self._verified.get(key_id)
        if known is None:
            with self._slow_checks:
                computed = _hash(secret, salt)
            if not hmac.compare_digest(computed, stored):
                return None
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
            self._verified[key_id] = digest
        elif not hmac.compare_digest(known, digest):
            return None
        return KeyHolder(key_id, self._tenant(tenant_row))

    def needs_slow_check(self, token: str) -> bool:
        """Whether authenticate(token) would run scrypt (a key not seen by this process yet)."""
        match = KEY_PATTERN.match(token)
        return match is not None and match.group(1) not in self._verified

    # ---- usage ---------------------------------------------------------------------------------

    def add_usage(self, tenant_id: str, expert: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one request; kept in memory and written by flush_usage (about every second, and before a read)."""
        key = (today(), tenant_id, expert)
        with self._usage_lock:
            counts = self._pending_usage.setdefault(key, [0, 0, 0])
            counts[0] += 1
            counts[1] += prompt_tokens
            counts[2] += completion_tokens

    def flush_usage(self) -> None:
        with self._usage_lock:
            pending, self._pending_usage = self._pending_usage, {}
        if not pending:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (day, tenant_id, expert) DO UPDATE SET "
                "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens",
                [(*key, *counts) for key, counts in pending.items()])
            self._db.execute("COMMIT")

    def usage(self, tenant_id: str | None = None, start: str | None = None, end: str | None = None) -> list[dict]:
        """Rows per day, tenant and expert (one tenant's, or every tenant's), oldest day first."""
        self.flush_usage()
        where, args = ["1 = 1"], []
        for clause, value in (("u.tenant_id = ?", tenant_id), ("u.day >= ?", start), ("u.day <= ?", end)):
            if value is not None:
                where.append(clause)
                args.append(value)
        rows = self._rows("SELECT u.day, u.tenant_id, COALESCE(t.name, ''), u.expert, u.requests, u.prompt_tokens, "
                          "u.completion_tokens FROM usage u LEFT JOIN tenants t ON t.id = u.tenant_id WHERE "
                          + " AND ".join(where) + " ORDER BY u.day, u.tenant_id, u.expert", args)
        return [{"object": "usage", "day": r[0], "tenant_id": r[1], "tenant": r[2], "model": r[3], "requests": r[4],
                 "prompt_tokens": r[5], "completion_tokens": r[6], "total_tokens": r[5] + r[6]} for r in rows]
