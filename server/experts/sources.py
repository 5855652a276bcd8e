"""Experts fetched on first use from the config's `adapter_sources`, kept in a bounded cache.

A request that names an unregistered expert which some source's patterns match starts one fetch of it (a
request for a name already being fetched waits for that fetch): the source streams the files to the
store's staging area within the size and time limits, and the expert is registered through the upload's
admission path (Experts.register: the same checks, the same store, listed, routable when its expert.json
describes it), with `source` the source's name and `origin` where its files were. The request is served
once that is done; fetches run in a pool of their own, so requests for other experts are not held up, and
their torch work (reading and checking the weights) keeps to one core.

A fetch that fails answers every request waiting for it with an AdmissionError naming why (not found,
too large, invalid adapter, source unreachable, timed out), leaves nothing behind (Experts.register is
all-or-nothing; the staging folder is removed) and is remembered for `adapter_refusal_ttl_s`, so a hot
bad name does not reach the source on every request.

The fetched experts take at most `adapter_cache_bytes` of the store; to make room, the least recently
used one is evicted (retired as an admin's DELETE would). Never evicted: experts of the config, of the
API (uploads, paths, mixtures, fine-tuning runs), one a request is using (pinned from before it is routed
until the engine holds the request, then in the engine's queues) and one a mixture blends. A restart keeps
the cache (the store's manifest lists fetched experts like any other); its order is then their fetch order.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from adapters.admission import AdmissionError, fill_from_folder
from adapters.lora import CONFIG_FILE, WEIGHTS_FILE
from adapters.names import check_source_name
from adapters.registry import AdapterRecord, ref_of
from adapters.sources import (INVALID, NOT_FOUND, TIMEOUT, TOO_LARGE, UNREACHABLE, AdapterSource, FetchLimits,
                              FolderSource, HubSource, S3Access, S3Source, SourceError)
from server.experts.spec import ExpertRegistration
from server.metrics import Metrics
from server.settings import AdapterSourceSpec, ConfigError, FolderSourceSpec, HubSourceSpec, S3SourceSpec
from server.tenants.principal import Principal

if TYPE_CHECKING:
    from server.experts.service import Experts

log = logging.getLogger("loraplex.sources")
MAX_REMEMBERED = 4096  # refusals remembered at once: names come from clients, so the memory is bounded
CACHE_FULL = "cache_full"
# how each failure is answered: (HTTP status, error code)
ANSWERS = {
    NOT_FOUND: (404, "model_not_found"),
    TOO_LARGE: (400, "adapter_too_large"),
    INVALID: (400, "invalid_adapter"),
    UNREACHABLE: (502, "adapter_source_unreachable"),
    TIMEOUT: (504, "adapter_fetch_timeout"),
    CACHE_FULL: (503, "adapter_cache_full"),
}
OUTCOME_BY_CODE = {code: outcome for outcome, (_, code) in ANSWERS.items()}


@dataclass(frozen=True)
class CachePolicy:
    """The settings of fetching and of the cache (server/settings.py describes each)."""

    max_bytes: int
    fetch_timeout_s: float
    concurrency: int
    refusal_ttl_s: float


def build_sources(specs: list[AdapterSourceSpec], timeout_s: float,
                  environ: Mapping[str, str] | None = None) -> list[AdapterSource]:
    """The configured sources, with what they read from the environment (endpoints, credentials) read now:
    a variable the config names that is not set is a ConfigError naming the variable, never its value."""
    environ = os.environ if environ is None else environ

    def read(spec, field: str) -> str | None:
        variable = getattr(spec, field)
        if variable is None:
            return None
        value = environ.get(variable)
        if not value:
            raise ConfigError(f"adapter source '{spec.name}': {field} names the environment variable {variable}, "
                              "which is not set")
        return value

    sources: list[AdapterSource] = []
    for spec in specs:
        if isinstance(spec, FolderSourceSpec):
            if not os.path.isdir(spec.path):
                raise ConfigError(f"adapter source '{spec.name}': {spec.path} is not a folder")
            sources.append(FolderSource(spec.name, spec.patterns, spec.path))
        elif isinstance(spec, S3SourceSpec):
            access = S3Access(read(spec, "endpoint_env"), read(spec, "region_env"), read(spec, "access_key_env"),
                              read(spec, "secret_key_env"), read(spec, "session_token_env"))
            sources.append(S3Source(spec.name, spec.patterns, spec.bucket, spec.prefix, access,
                                    spec.addressing_style, timeout_s))
        elif isinstance(spec, HubSourceSpec):
            sources.append(HubSource(spec.name, spec.patterns, spec.namespace, spec.revision, spec.cache_dir,
                                     read(spec, "token_env"), timeout_s, read(spec, "endpoint_env")))
    return sources


def _folder_bytes(folder: str) -> int:
    total = 0
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            total += os.stat(os.path.join(folder, file)).st_size
        except OSError:
            pass
    return total


FETCH_NICE = 10  # weight 110 against the engine's 1024: fetches take what the engine leaves, never stop


def _background_fetch_thread() -> None:
    """A fetch thread reads and checks weights with torch on one core (OpenMP counts threads per calling
    thread, so the engine keeps its own), and at a lower scheduling priority than the engine: on Linux a
    thread's nice value is its own (setpriority on its thread id), so streams keep their cores while a
    fetch's read-and-check takes the time they leave. The check releases the GIL (torch, hashing), so a
    lowered thread rarely holds what the engine waits for; elsewhere the call is skipped."""
    import torch

    torch.set_num_threads(1)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FETCH_NICE)
    except (AttributeError, OSError):  # not Linux, or refused: fetches still run, at the engine's priority
        pass


class FetchedExperts:
    def __init__(self, experts: "Experts", sources: list[AdapterSource], policy: CachePolicy, metrics: Metrics):
        self.experts, self.sources, self.policy, self.metrics = experts, sources, policy, metrics
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # fetched expert -> store bytes, least recent first
        self._reserved = 0  # bytes of fetches admitted and not yet registered
        self._pins: Counter[str] = Counter()  # names requests asked for that are not yet in the engine's queues
        self._fetching: dict[str, Future] = {}
        self._refused: OrderedDict[str, tuple[float, AdmissionError]] = OrderedDict()
        self._pool = ThreadPoolExecutor(policy.concurrency, thread_name_prefix="loraplex-fetch",
                                        initializer=_background_fetch_thread)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- what the cache holds -----------------------------------------------------------------

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._entries.values())

    def cached(self) -> list[str]:
        """Fetched experts, least recently used first."""
        with self._lock:
            return list(self._entries)

    def keep(self, records: Iterable[AdapterRecord]) -> list[AdapterRecord]:
        """At start: the fetched experts of the store that fit the cache, newest first kept; the rest are
        returned, for the caller to drop (they are fetched again when asked for)."""
        kept: list[tuple[AdapterRecord, int]] = []
        dropped, used = [], 0
        for record in sorted(records, key=lambda r: r.created, reverse=True):
            size = _folder_bytes(record.folder)
            if used + size > self.policy.max_bytes:
                dropped.append(record)
                continue
            used += size
            kept.append((record, size))
        with self._lock:
            for record, size in reversed(kept):  # oldest first: the least recently used end
                self._entries[record.ref] = size
        return dropped

    def forget(self, ref: str) -> None:
        """`ref` was retired (an admin's DELETE): no longer in the cache."""
        with self._lock:
            self._entries.pop(ref, None)

    @contextmanager
    def pinned(self, *names: str | None, owner: str = ""):
        """While inside, an expert with one of these names (for `owner`: its own or a shared one) is not
        evicted: held by a request from before it is routed until the engine has it queued (where
        adapters_in_use sees it)."""
        names = list({ref for name in names if name for ref in (name, ref_of(name, owner))})
        with self._lock:
            self._pins.update(names)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(names)
                for name in names:
                    if self._pins[name] <= 0:
                        del self._pins[name]

    def touch(self, names: Iterable[str]) -> None:
        """A request routed to these experts without fetching: the fetched ones among them become the most
        recently used, and count as cache hits."""
        with self._lock:
            for name in names:
                if name in self._entries:
                    self._entries.move_to_end(name)
                    self.metrics.adapter_cache_hits.inc()

    # ---- fetching -----------------------------------------------------------------------------

    def fetch(self, name: str, param: str, owner: str = "") -> Future | None:
        """A Future of the record of `name`, fetched from the first source that has it (a fetch already
        under way for it is shared); None when no source's patterns match `name` (a plain unknown model).
        Raises AdmissionError at once for a name no source may be asked for, or one refused recently. Each
        tenant fetches into its own namespace (adapters/registry.py ref_of): its own copy, its own refusals."""
        sources = [source for source in self.sources if source.matches(name)]
        if not sources:
            return None
        try:
            check_source_name(name)
        except ValueError as exc:
            raise AdmissionError(400, f"{exc}; such a name is never looked up in an adapter source", param,
                                 "invalid_model_name") from None
        ref = ref_of(name, owner)
        with self._lock:
            record = self._registered(name, owner)
            if record is not None:  # registered since the request was routed
                done: Future = Future()
                done.set_result(record)
                return done
            self.metrics.adapter_cache_misses.inc()
            refused = self._refused.get(ref)
            if refused is not None:
                expires, error = refused
                if time.monotonic() < expires:
                    raise AdmissionError(error.status, error.message, param, error.code)
                del self._refused[ref]
            running = self._fetching.get(ref)
            if running is None:
                running = self._pool.submit(self._fetch, name, sources, param, owner)
                self._fetching[ref] = running
            return running

    def _registered(self, name: str, owner: str) -> AdapterRecord | None:
        """The expert a request of `owner` means by `name` (its own, else a shared one), if one is registered."""
        return self.experts.registry.lookup(name, Principal(tenant=owner or None))

    def _fetch(self, name: str, sources: list[AdapterSource], param: str, owner: str = "") -> AdapterRecord:
        """In the fetch pool: each matching source in order until one has `name`."""
        ref = ref_of(name, owner)
        try:
            tried = []
            for source in sources:
                started = time.monotonic()
                outcome = "fetched"
                try:
                    return self._fetch_from(source, name, param, owner)
                except SourceError as exc:
                    outcome = exc.kind
                    if exc.kind == NOT_FOUND:
                        tried.append(source.name)
                        continue
                    status, code = ANSWERS[exc.kind]
                    raise AdmissionError(status, f"The adapter '{name}' cannot be fetched from source "
                                                 f"'{source.name}': {exc.message}.", param, code) from None
                except AdmissionError as exc:
                    outcome = OUTCOME_BY_CODE.get(exc.code, INVALID)
                    raise
                except Exception as exc:
                    outcome = "error"
                    log.exception("fetching %s from source %s failed", name, source.name)
                    raise AdmissionError(502, f"Fetching the adapter '{name}' from source '{source.name}' failed "
                                              f"({type(exc).__name__}).", param, "adapter_fetch_failed") from None
                finally:
                    self.metrics.adapter_fetches.labels(source.name, outcome).inc()
                    self.metrics.adapter_fetch_time.labels(source.name).observe(time.monotonic() - started)
            status, code = ANSWERS[NOT_FOUND]
            raise AdmissionError(status, f"The model '{name}' does not exist: no adapter source has it (asked "
                                         f"{', '.join(repr(s) for s in tried)}).", param, code)
        except AdmissionError as exc:
            if exc.code != ANSWERS[CACHE_FULL][1]:  # a full cache empties as requests end: not remembered
                self._remember(ref, exc)
            log.info("fetch of %s refused: %s", name, exc.message)
            raise
        finally:
            with self._lock:
                self._fetching.pop(ref, None)

    def _remember(self, name: str, error: AdmissionError) -> None:
        if self.policy.refusal_ttl_s <= 0:
            return
        with self._lock:
            self._refused[name] = (time.monotonic() + self.policy.refusal_ttl_s, error)
            self._refused.move_to_end(name)
            while len(self._refused) > MAX_REMEMBERED:
                self._refused.popitem(last=False)

    def _fetch_from(self, source: AdapterSource, name: str, param: str, owner: str = "") -> AdapterRecord:
        """Download into staging, admit and register (Experts.register), inside the cache's room."""
        staging = self.experts.store.staging_dir()
        try:
            limits = FetchLimits.starting_now(self.experts.policy.max_adapter_bytes, self.policy.fetch_timeout_s)
            fetched = source.fetch(name, staging, limits)
            self.metrics.adapter_fetched_bytes.labels(source.name).inc(fetched)
            try:
                registration = fill_from_folder(ExpertRegistration(name=name), staging)
            except AdmissionError as exc:
                raise SourceError(INVALID, exc.message) from None
            size = _folder_bytes(str(staging))
            if size > self.policy.max_bytes:
                raise SourceError(TOO_LARGE, f"it takes {size} bytes, more than the whole cache of fetched experts "
                                             f"(adapter_cache_bytes: {self.policy.max_bytes})")
            self._make_room(name, size, param)
            try:
                with open(staging / CONFIG_FILE, "rb") as config, open(staging / WEIGHTS_FILE, "rb") as weights:
                    record = self.experts.register(registration, {"adapter_config": config, "adapter_model": weights},
                                                   source.name, origin=source.origin(name), owner=owner)
            except AdmissionError as exc:
                registered = self._registered(name, owner)
                if exc.status == 409 and registered is not None:
                    return registered  # registered meanwhile (by an admin, or this tenant): that one serves
                kind = TOO_LARGE if exc.status == 413 else INVALID
                raise SourceError(kind, exc.message) from None
            finally:
                with self._lock:
                    self._reserved -= size
            with self._lock:
                self._entries[record.ref] = _folder_bytes(record.folder)
            log.info("fetched %s from source %s (%s, %d bytes)", name, source.name, record.origin, fetched)
            return record
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _make_room(self, name: str, size: int, param: str) -> None:
        """Reserve `size` bytes, evicting the least recently used fetched experts no request is using.
        They leave the registry under the cache's lock, after the pins were checked under it: a request
        that asks for one later finds it unregistered and fetches it again; one that pinned it first keeps it."""
        evicted: list[AdapterRecord] = []
        with self._lock:
            excess = sum(self._entries.values()) + self._reserved + size - self.policy.max_bytes
            if excess > 0:
                in_use = self.experts.engine.adapters_in_use()
                for victim, nbytes in list(self._entries.items()):
                    if excess <= 0:
                        break
                    if victim in self._pins:
                        continue
                    record = self.experts.registry.get(victim)
                    if record is not None:
                        if record.key in in_use:
                            continue
                        gone, users = self.experts.registry.retire(victim)
                        if users:  # a mixture blends it
                            continue
                        if gone is not None:
                            evicted.append(gone)
                    del self._entries[victim]
                    excess -= nbytes
                if excess > 0:
                    status, code = ANSWERS[CACHE_FULL]
                    raise AdmissionError(status, f"The adapter '{name}' cannot be fetched now: the cache of fetched "
                                                 f"experts (adapter_cache_bytes: {self.policy.max_bytes}) is full of "
                                                 "experts that requests are using. Retry shortly.", param, code)
            self._reserved += size
        for record in evicted:  # out of the registry already: the rest of the retirement, outside the lock
            self.metrics.adapter_cache_evictions.inc()
            log.info("evicted fetched expert %s (least recently used) to make room for %s", record.name, name)
            self.experts.dismantle(record)
