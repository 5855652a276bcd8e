"""Experts: the one owner of an expert's life, below the HTTP edge.

Register (a folder under the adapter roots, an upload, a mixture of registered experts, a fine-tuning
run's output), retire, correct the router's examples, restore at start, index for the router, hand the
weights to the engine: each is one method here, and each talks to the registry, the store, the router's
index and the engine in the one order that keeps them consistent. Registration is all-or-nothing: a
step that fails undoes every step before it (files, engine entry, index entry, the reserved name).

Refusals are AdmissionError (its status, message, param and code: the edge answers it as it is);
nothing here knows HTTP. Methods that load weights or write the store block: the edge calls them in a
thread, and they finish what they started even if the client goes away.
"""
from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from adapters.admission import (
    AdmissionError,
    check_new_name,
    check_token_ids,
    fill_from_folder,
    name_taken,
    stage_from_path,
    stage_upload,
    validate_staged,
)
from adapters.lora import CONFIG_FILE, WEIGHTS_FILE, BaseShape
from adapters.registry import AdapterRecord, AdapterRegistry, UnregisteredMember, new_key, ref_of, shown
from adapters.sources import AdapterSource
from adapters.store import AdapterStore
from validation.unicode import find_unencodable, unencodable_message
from router.classifier import ExpertClassifier, ExpertProfile
from router.encoder import RouterEncoder
from router.resolve import AUTO_MODEL, ExpertRouter, Route
from server.engine.interface import EngineHandle
from server.experts.sources import CachePolicy, FetchedExperts
from server.experts.spec import ExpertRegistration
from server.metrics import Metrics
from server.settings import AdapterSpec
from server.tenants.principal import OPERATOR, SHARED, Principal
from server.tenants.store import Limits

log = logging.getLogger("loraplex.experts")
REGISTER_TIMEOUT_S = 600  # the engine loads an adapter between steps: seconds at most, even for big ones
MAX_EXAMPLES = 1000  # per expert and kind (corrections): the index refits on every change, and stays fast past this


@dataclass(frozen=True)
class ServedBase:
    """What registration checks an expert against."""

    name: str
    names: frozenset[str]  # names an adapter's base_model_name_or_path may use for this base
    vocab_size: int
    shape: BaseShape


@dataclass(frozen=True)
class ExpertPolicy:
    """The settings that decide what may be registered (server/settings.py describes each)."""

    adapter_roots: tuple[str, ...]
    max_adapter_bytes: int
    max_adapter_rank: int
    base_mismatch: str


@dataclass(frozen=True)
class Correction:
    """What one router correction did: its action, the expert whose record changed, the routes around it."""

    action: str
    changed_expert: str | None
    before: Route
    after: Route


class Experts:
    def __init__(self, registry: AdapterRegistry, store: AdapterStore, engine: EngineHandle, metrics: Metrics,
                 policy: ExpertPolicy, sources: list[AdapterSource] = (), cache: CachePolicy | None = None):
        self.registry, self.store, self.engine, self.metrics, self.policy = registry, store, engine, metrics, policy
        # experts fetched on first use from the config's adapter_sources, in a bounded cache (sources.py)
        self.fetched = FetchedExperts(self, list(sources), cache or CachePolicy(10**10, 60.0, 1, 30.0), metrics)
        metrics.watch_adapter_cache(self.fetched.used_bytes, self.fetched.policy.max_bytes)
        self.base: ServedBase | None = None  # set by attach(), once the base is loaded
        self.router: ExpertRouter | None = None
        self._corrections = threading.Lock()  # one read-modify-write of a record at a time

    def attach(self, base: ServedBase, router: ExpertRouter) -> None:
        self.base, self.router = base, router

    def _reserved_names(self) -> set[str]:
        return {self.base.name, *self.router.auto_names}

    # ---- registration ------------------------------------------------------------------------

    # ---- who may use what (server/tenants/principal.py) ------------------------------------------

    def visible(self, principal: Principal) -> Principal | None:
        """Who the router looks names up for: `principal`'s namespace, the experts it may use; None for an
        admin (everything, by ref)."""
        return None if principal.admin else principal

    def lookup(self, name: str, principal: Principal) -> AdapterRecord | None:
        """The expert `principal` means by `name` (its namespace: adapters/registry.py), if it may use it."""
        return self.registry.lookup(name, self.visible(principal))

    def listed(self, principal: Principal) -> list[AdapterRecord]:
        return [r for r in self.registry.all() if principal.may_use(r.owner)]

    def _check_quota(self, owner: str, limits: Limits | None, nbytes: int) -> None:
        """A tenant's max_experts and max_expert_bytes, with one more expert of `nbytes`: 429 past either."""
        if limits is None or owner == SHARED:
            return
        own = [r for r in self.registry.all() if r.owner == owner]
        if limits.max_experts is not None and len(own) + 1 > limits.max_experts:
            raise AdmissionError(429, f"This tenant has {len(own)} experts, its limit (max_experts: "
                                      f"{limits.max_experts}); retire one first.", "name", "insufficient_quota")
        used = sum(r.nbytes for r in own)
        if limits.max_expert_bytes is not None and used + nbytes > limits.max_expert_bytes:
            raise AdmissionError(429, f"This expert ({nbytes} bytes) would take this tenant's experts to "
                                      f"{used + nbytes} bytes, over its limit (max_expert_bytes: "
                                      f"{limits.max_expert_bytes}).", "name", "insufficient_quota")

    def register(self, registration: ExpertRegistration, files: dict | None, source: str,
                 origin: str = "", owner: str = SHARED, limits: Limits | None = None) -> AdapterRecord:
        """Check, store, load and index a new expert, then list it. `files`: the two uploaded files
        (bytes or binary files) keyed adapter_config / adapter_model, or None to register from
        `registration.path` or `registration.mixture`. `origin`: where an adapter source's files came from
        (sources.py); such an expert may have a name of '/'-joined parts, and lives in the cache of fetched
        experts. `owner`: the tenant it belongs to (SHARED: everyone's), within its `limits`. Blocking."""
        if registration.mixture is not None:
            return self._register_mixture(registration, owner, limits)
        self._check_quota(owner, limits, 0)
        name = registration.name
        check_new_name(name, self._reserved_names(), nested=bool(origin))
        ref = self._claim(name, owner)
        staging = self.store.staging_dir()
        folder = None
        record = None
        classifier = self.router.classifier
        try:
            weights, registration = self._stage_and_validate(registration, files, staging)
            self._check_quota(owner, limits, weights.nbytes)
            key = new_key(name)
            folder = self.store.commit_files(staging, key)
            record = AdapterRecord.create(name, str(folder), source, weights, registration, key, origin, owner)
            self.engine.register_adapter(key, str(folder), weights).result(REGISTER_TIMEOUT_S)
            if classifier is not None:  # indexed before it is listed: routable from the next request on
                classifier.add(ref, ExpertProfile.of(record))
            # the manifest is written last: once it names the expert, the registration has happened
            self.store.add_entry(ref, record.to_manifest())
        except BaseException:
            # leave nothing behind: no staging files, no store folder, no engine entry, no index entry, no name
            shutil.rmtree(staging, ignore_errors=True)
            if classifier is not None:
                classifier.remove(ref)
            if record is not None:
                self.engine.retire_adapter(record.key)
            elif folder is not None:
                self.store.delete_files(folder)
            self.registry.release(ref)
            raise
        self.registry.add(record)
        return record

    def _claim(self, name: str, owner: str, members: tuple[str, ...] = ()) -> str:
        """Reserve `name` in `owner`'s namespace (ref_of); 409 when taken there. A tenant's name may not be a
        shared expert's either (it could no longer reach that one by name), which tells it nothing it cannot
        list; another tenant's experts of that name never stand in its way."""
        ref = ref_of(name, owner)
        if (owner != SHARED and self.registry.get(name) is not None) or not self.registry.reserve(ref, members):
            raise name_taken(name)
        return ref

    def register_trained(self, folder: Path, registration: ExpertRegistration, owner: str = SHARED) -> AdapterRecord:
        """A fine-tuning run's adapter folder, through the upload's admission path (its files are copied
        into the store like an upload's); it belongs to the job's tenant. Blocking."""
        with open(folder / CONFIG_FILE, "rb") as config, open(folder / WEIGHTS_FILE, "rb") as weights:
            return self.register(registration, {"adapter_config": config, "adapter_model": weights}, "fine-tune",
                                 owner=owner)

    def _stage_and_validate(self, registration: ExpertRegistration, files, staging: Path):
        policy, base = self.policy, self.base
        if files is None:
            stage_from_path(registration.path, list(policy.adapter_roots), staging, policy.max_adapter_bytes)
            registration = fill_from_folder(registration, staging)  # its expert.json, as checked and staged
        else:
            stage_upload(files["adapter_config"], files["adapter_model"], staging, policy.max_adapter_bytes)
        check_token_ids(registration.stop_token_ids, base.vocab_size, "stop_token_ids")
        weights = validate_staged(staging, base.shape, policy.max_adapter_rank, base.names, policy.base_mismatch)
        return weights, registration

    def _register_mixture(self, registration: ExpertRegistration, owner: str = SHARED,
                          limits: Limits | None = None) -> AdapterRecord:
        """A named blend of registered experts (those its owner may use): checked as a request's mixture is,
        no weights of its own."""
        name = registration.name
        check_new_name(name, self._reserved_names())
        self._check_quota(owner, limits, 0)
        pairs = list(registration.mixture.items())
        principal = Principal(tenant=owner) if owner != SHARED else OPERATOR
        for member, _ in pairs:
            record = self.registry.lookup(member, self.visible(principal))
            if record is not None and record.mixture:
                raise AdmissionError(400, f"'{member}' is itself a mixture; blend its experts instead", "mixture")
        # BadMixture: 400 naming the problem (an expert it may not use is "not a registered expert")
        route = self.router.mixture(pairs, "mixture", "mixture", name, self.visible(principal))
        if route.expert is None:
            raise AdmissionError(400, "a mixture needs at least one expert with a weight above 0", "mixture")
        check_token_ids(registration.stop_token_ids, self.base.vocab_size, "stop_token_ids")
        members = tuple(member for member, _ in route.mixture or ((route.expert, 1.0),))
        try:  # the members are pinned from here: retiring one now is refused until this ends
            ref = self._claim(name, owner, members)
        except UnregisteredMember as exc:  # retired since the check above
            raise AdmissionError(400, f"'{exc.names[0]}' in the mixture is not a registered expert",
                                 "mixture") from None
        classifier = self.router.classifier
        defaults = {k: getattr(registration, k) for k in ("temperature", "top_p", "max_tokens")
                    if getattr(registration, k) is not None}
        record = AdapterRecord(name=name, key=new_key(name), folder="", source="mixture", rank=0, target_modules=(),
                               nbytes=0, description=registration.description,
                               examples=tuple(registration.examples),
                               negative_examples=tuple(registration.negative_examples),
                               router_margin=registration.router_margin, stop=tuple(registration.stop),
                               stop_token_ids=frozenset(registration.stop_token_ids), defaults=defaults,
                               mixture=route.mixture or ((route.expert, 1.0),), owner=owner)
        try:
            if classifier is not None:
                classifier.add(ref, ExpertProfile.of(record))
            self.store.add_entry(ref, record.to_manifest())
        except BaseException:
            if classifier is not None:
                classifier.remove(ref)
            self.registry.release(ref)
            raise
        self.registry.add(record)
        return record

    # ---- retirement ---------------------------------------------------------------------------

    def existing(self, name: str, param: str = "name", principal: Principal = OPERATOR) -> AdapterRecord:
        """The registered expert `name` if `principal` may use it, else a 404 naming where the name came from
        (the same 404 whether it does not exist or belongs to another tenant)."""
        record = self.registry.lookup(name, self.visible(principal))
        if record is None:
            raise AdmissionError(404, f"No adapter named '{name}' is registered.", param, "adapter_not_found")
        return record

    def changeable(self, name: str, param: str, principal: Principal) -> AdapterRecord:
        """The expert `name` if `principal` may retire or correct it: 404 as existing(); 403 for a shared one."""
        record = self.existing(name, param, principal)
        if not principal.may_change(record.owner):
            raise AdmissionError(403, f"'{name}' is shared by the server's operator; only the admin key may change "
                                      "it.", param, "permission_denied")
        return record

    def retire(self, name: str, principal: Principal = OPERATOR) -> AdapterRecord:
        """Unlist, unindex and forget an expert; its running requests finish on it, then the engine frees
        its memory and files. Blocking (the manifest is rewritten)."""
        found = self.changeable(name, "name", principal)
        if found.source == "config":
            raise AdmissionError(400, f"'{name}' comes from the config file; remove it there and restart", "name")
        # checked and removed in one step: a mixture being registered meanwhile either pins it first (409
        # here) or finds it gone (its registration fails), never both succeed
        record, users = self.registry.retire(found.ref)
        if users:
            # only mixtures its owner (or an admin) may see can blend it: a tenant's mixtures blend its own
            # and shared experts, and a shared expert is only retired by an admin
            blends = ", ".join(shown(user, principal.tenant) for user in users)
            raise AdmissionError(409, f"'{name}' is blended by the mixture(s) {blends}; retire those first",
                                 "name", "adapter_in_use")
        if record is None:  # retired by a concurrent request
            raise AdmissionError(404, f"No adapter named '{name}' is registered.", "name", "adapter_not_found")
        self.dismantle(record)
        return record

    def dismantle(self, record: AdapterRecord) -> None:
        """The rest of a retirement, once the registry no longer lists `record`: its metrics series, its index
        entry, its manifest entry, and (once running requests are done) its weights and files."""
        if record.fetched:
            self.fetched.forget(record.ref)
        self.metrics.forget_expert(record.ref)
        if self.router.classifier is not None:
            self.router.classifier.remove(record.ref)
        self.store.remove_entry(record.ref, record.key)
        if not record.mixture:  # a mixture has no weights of its own
            self.engine.retire_adapter(record.key)

    # ---- experts fetched on first use (sources.py) ----------------------------------------------

    def fetch(self, name: str, param: str, owner: str = SHARED):
        """A Future of `name`'s record, fetched from the adapter sources (for `owner`, if this request fetches
        it); None if no source may resolve it."""
        return self.fetched.fetch(name, param, owner)

    def pinned(self, *names: str | None, owner: str = SHARED):
        """A request's hold on the experts it names (for `owner`), until the engine has it (no eviction meanwhile)."""
        return self.fetched.pinned(*names, owner=owner)

    def touch(self, names) -> None:
        """A request was routed to these experts (the cache's recency and hits)."""
        self.fetched.touch(names)

    # ---- router corrections -------------------------------------------------------------------

    def correct(self, prompt: str, expert: str, param: str, principal: Principal = OPERATOR) -> Correction:
        """Fold one misroute into the experts' records: naming an expert adds `prompt` to its examples;
        naming the base adds it to the negative examples of the expert that takes it now (for `principal`:
        among the experts it may use). Persisted, re-indexed at once. Blocking (runs the encoder, rewrites the
        manifest)."""
        router, visible = self.router, self.visible(principal)
        if expert != self.base.name:
            self.correctable(expert, param, principal)
        with self._corrections:
            before = router.by_prompt(prompt, visible=visible)
            if expert == self.base.name:
                if before.source != "classifier" or before.expert is None:
                    action, target = "already_falls_back", None
                else:
                    target = self.correctable(before.expert, param, principal)
                    added = self._add_prompt(target, "negative_examples", prompt)
                    action = "negative_example_added" if added else "already_a_negative_example"
            else:
                target = self.correctable(expert, param, principal)
                added = self._add_prompt(target, "examples", prompt)
                action = "example_added" if added else "already_an_example"
            after = router.by_prompt(prompt, visible=visible)
        return Correction(action, target.shown_to(principal.tenant) if target else None, before, after)

    def correctable(self, name: str, param: str, principal: Principal = OPERATOR) -> AdapterRecord:
        """The expert `name` if its router examples may be corrected over the API by `principal` (404 unknown or
        another tenant's, 403 shared, 400 from the config)."""
        record = self.existing(name, param, principal)
        if record.source != "config":
            record = self.changeable(name, param, principal)
        if record.source == "config":
            raise AdmissionError(400, f"'{name}' comes from the config file; add the example to its entry there", param)
        return record

    def _add_prompt(self, record: AdapterRecord, field: str, prompt: str) -> bool:
        """Add `prompt` to the record's `field` ("examples" or "negative_examples"); False if already there.
        Every write is conditional on the registration key read, so a racing retirement is never undone."""
        current = getattr(record, field)
        if prompt in current:
            return False
        if len(current) >= MAX_EXAMPLES:
            raise AdmissionError(400, f"'{record.name}' already has {MAX_EXAMPLES} {field.replace('_', ' ')}; "
                                      "remove some by registering it again", "corrections")
        updated = replace(record, **{field: (*current, prompt)})
        gone = AdmissionError(404, f"'{record.name}' was retired meanwhile.", "corrections", "adapter_not_found")
        if not self.store.update_entry(record.ref, updated.to_manifest()):
            raise gone
        if not self.registry.update(updated):
            raise gone
        classifier = self.router.classifier
        classifier.add(record.ref, ExpertProfile.of(updated))
        if self.registry.get(record.ref) is None:  # retired while re-indexing: not routable
            classifier.remove(record.ref)
        return True

    # ---- start -------------------------------------------------------------------------------

    def restore(self, config_adapters: dict[str, AdapterSpec], base: ServedBase, auto_names: list[str],
                register) -> None:
        """The config's experts (read and checked now) and the store's (read from disk on first use), each
        handed to the engine by `register(key, folder, weights_or_None)` (on the engine thread, its adapter
        cache's own) and listed. Only the registry's writer calls this: it also removes store folders no
        manifest entry names. A bad config expert raises AdmissionError naming it."""
        policy = self.policy
        for name, spec in config_adapters.items():
            try:
                spec = fill_from_folder(spec, spec.path)
                check_new_name(name, {base.name, AUTO_MODEL, *auto_names})
                check_token_ids(spec.stop_token_ids, base.vocab_size, "stop_token_ids")
                weights = validate_staged(Path(spec.path), base.shape, policy.max_adapter_rank, base.names,
                                          policy.base_mismatch)
            except AdmissionError as exc:
                raise AdmissionError(exc.status, f"adapter '{name}' from {spec.path}: {exc.message}") from exc
            record = AdapterRecord.create(name, spec.path, "config", weights, spec)
            register(record.key, record.folder, weights)
            self.registry.add(record)
            log.info("loaded adapter %s from %s", name, spec.path)
        orphans = self.store.collect_garbage()
        if orphans:
            log.warning("removed %d store folders no manifest entry named (an interrupted registration)",
                        len(orphans))
        stored = []
        for name, entry in self.store.read_manifest().items():
            problem = find_unencodable(entry)
            if problem is not None:  # written by an older version that let such text in: kept on disk, not served
                log.error("manifest entry %s is not served: %s", name, unencodable_message(problem))
                continue
            record = AdapterRecord.from_manifest(entry)
            if record.ref in config_adapters:
                log.warning("adapter %s is in the config and in the store; serving the config's", name)
                continue
            if name != record.ref:  # written before each tenant had its own namespace: keyed by name
                self.store.rename_entry(name, record.ref)
            stored.append(record)
        # fetched experts beyond adapter_cache_bytes (lowered since they were fetched): the oldest go
        dropped = self.fetched.keep(r for r in stored if r.fetched)
        for record in dropped:
            self.store.remove_entry(record.ref, record.key)
            self.store.delete_files(record.folder)
            log.info("fetched expert %s dropped from the cache at start (adapter_cache_bytes)", record.name)
        dropped_keys = {record.key for record in dropped}
        for record in stored:
            if record.key in dropped_keys:
                continue
            if not record.mixture:  # a mixture has no weights of its own
                register(record.key, record.folder, None)  # read from disk on first use
            self.registry.add(record)
        for record in self.registry.all():
            if record.mixture and record.owner != SHARED and not all(self.registry.get(m) for m, _ in record.mixture):
                record = self._rename_members(record)
            # written before retirement was atomic with mixtures: kept, not served
            missing = [member for member, _ in record.mixture if self.registry.get(member) is None]
            if missing:
                self.registry.retire(record.ref)
                log.error("mixture %s is not served: it blends %s, which %s not registered", record.name,
                          ", ".join(missing), "is" if len(missing) == 1 else "are")
        log.info("%d experts registered", len(self.registry.all()))

    def _rename_members(self, record: AdapterRecord) -> AdapterRecord:
        """A tenant's mixture written before each tenant had its own namespace names its members by name:
        they are looked up in its namespace as then, and written back by ref."""
        viewer = Principal(tenant=record.owner)
        members = []
        for member, weight in record.mixture:
            found = self.registry.lookup(member, viewer)
            members.append((found.ref if found is not None else member, weight))
        updated = replace(record, mixture=tuple(members))
        if updated != record and self.registry.update(updated):
            self.store.update_entry(updated.ref, updated.to_manifest())
        return updated

    def build_index(self) -> None:
        """Load the router's sentence encoders and index every expert, beside the engine (its own thread);
        experts registered or retired meanwhile are caught up before the index is used."""
        router = self.router
        try:
            classifier = ExpertClassifier(RouterEncoder.embedded())
        except FileNotFoundError as exc:
            router.unavailable_reason = str(exc)
            log.warning(router.unavailable_reason)
            return
        except Exception as exc:  # say why in /health instead of "loading" forever
            router.unavailable_reason = f"the router's encoder failed to load: {exc}"
            log.exception("router encoder failed to load")
            return
        _index(classifier, self.registry.all())
        router.classifier = classifier
        _index(classifier, [r for r in self.registry.all() if r.ref not in classifier.experts()])
        for name in classifier.experts():
            if self.registry.get(name) is None:
                classifier.remove(name)
        log.info("router ready (%s): %d experts routable, %d of %d background prompts kept",
                 classifier.encoder_name, len(classifier.experts()), classifier.background_kept(),
                 classifier.background_size)


def _index(classifier: ExpertClassifier, records) -> None:
    """Index the experts in one refit; if that fails, one by one, so one bad expert stays reachable by
    name only and the rest are indexed."""
    try:
        classifier.add_many({record.ref: ExpertProfile.of(record) for record in records})
        return
    except Exception:
        log.exception("indexing the experts together failed; indexing them one by one")
    for record in records:
        try:
            classifier.add(record.ref, ExpertProfile.of(record))
        except Exception:
            log.exception("expert %s cannot be routed to: indexing its description/examples failed", record.name)
