"""The experts the server knows about: metadata only (weights live with the engine)."""
from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    # unique per registration: the engine's handle for the weights, so a name that is
    # deleted and registered again never meets the old weights still finishing a request
    key: str
    folder: str  # where the engine (re)loads the files from
    source: str  # config | path | upload | mixture | fine-tune | the name of the adapter source it was fetched from
    rank: int
    target_modules: tuple[str, ...]
    nbytes: int
    description: str = ""
    examples: tuple[str, ...] = ()
    negative_examples: tuple[str, ...] = ()  # prompts the router must not send here
    router_margin: float | None = None  # this expert's own routing margin (else the server's)
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    defaults: dict = field(default_factory=dict)  # sampling defaults: temperature, top_p, max_tokens
    created: int = field(default_factory=lambda: int(time.time()))
    # a registered mixture: (member expert, weight) pairs summing to 1, no weights of its own (rank 0)
    mixture: tuple[tuple[str, float], ...] = ()
    # fetched from an adapter source on first use: where from (s3://..., hf://..., file://...). Such an expert
    # lives in the bounded cache of fetched experts and may be evicted; one registered otherwise never is
    origin: str = ""
    # the tenant that registered it (uploaded, fetched, fine-tuned, blended it); "" = shared: the config's, an
    # admin's, and every expert of a server without tenants (server/tenants/principal.py: who may use it)
    owner: str = ""

    @property
    def fetched(self) -> bool:
        return bool(self.origin)

    @property
    def ref(self) -> str:
        """What the registry, the router's index, the store and metrics know it by: its name when shared,
        `name@tenant` when a tenant's (ref_of)."""
        return ref_of(self.name, self.owner)

    def shown_to(self, tenant: str | None) -> str:
        """How an answer to `tenant` names it: by its name (the tenant's own or a shared expert), else (an
        admin looking at another tenant's) by its ref."""
        return shown(self.ref, tenant)

    @classmethod
    def create(cls, name: str, folder: str, source: str, weights, spec, key: str | None = None,
               origin: str = "", owner: str = "") -> "AdapterRecord":
        """A new registration of `name` (under `key`, else a fresh one). spec: anything with description,
        examples, negative_examples, router_margin, stop, stop_token_ids and the sampling defaults
        temperature / top_p / max_tokens."""
        defaults = {k: getattr(spec, k) for k in ("temperature", "top_p", "max_tokens") if getattr(spec, k) is not None}
        return cls(name=name, key=key or new_key(name), folder=folder, source=source, rank=weights.rank,
                   target_modules=weights.target_modules, nbytes=weights.nbytes, description=spec.description,
                   examples=tuple(spec.examples), negative_examples=tuple(spec.negative_examples),
                   router_margin=spec.router_margin, stop=tuple(spec.stop),
                   stop_token_ids=frozenset(spec.stop_token_ids), defaults=defaults, origin=origin,
                   owner=owner)

    def to_manifest(self) -> dict:
        entry = asdict(self)
        entry["target_modules"] = list(self.target_modules)
        entry["examples"] = list(self.examples)
        entry["negative_examples"] = list(self.negative_examples)
        entry["stop"] = list(self.stop)
        entry["stop_token_ids"] = sorted(self.stop_token_ids)
        entry["mixture"] = [list(pair) for pair in self.mixture]
        return entry

    @classmethod
    def from_manifest(cls, entry: dict) -> "AdapterRecord":
        return cls(
            **{
                **entry,
                "target_modules": tuple(entry["target_modules"]),
                "examples": tuple(entry.get("examples", ())),
                "negative_examples": tuple(entry.get("negative_examples", ())),
                "stop": tuple(entry.get("stop", ())),
                "stop_token_ids": frozenset(entry.get("stop_token_ids", ())),
                "mixture": tuple((str(name), float(weight)) for name, weight in entry.get("mixture", ())),
            }
        )


class UnregisteredMember(LookupError):
    """A mixture names experts that are not registered (or were just retired)."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


def ref_of(name: str, owner: str) -> str:
    """Each tenant has its own namespace of expert names: tenant A's `pirate` and tenant B's `pirate` are two
    experts, `pirate@A` and `pirate@B` here, and neither tenant can learn (by a 409, say) that the other
    has one. A shared expert's ref is its name. '@' is in no expert's name and no tenant's id, so refs never
    collide with names."""
    return f"{name}@{owner}" if owner else name


def shown(ref: str, tenant: str | None) -> str:
    """The name an answer to `tenant` gives the expert `ref`: a tenant's own and shared ones by name."""
    name, _, owner = ref.partition("@")
    return name if not owner or owner == tenant else ref


class Viewer(Protocol):
    """Who looks a name up (server/tenants/principal.py's Principal): its namespace, and whose experts it may use."""

    tenant: str | None

    def may_use(self, owner: str) -> bool: ...


def new_key(name: str) -> str:
    """A registration key: also the expert's folder name in the store, so a fetched `team/x` is `team~x-...`."""
    return f"{name.replace('/', '~')}-{uuid.uuid4().hex[:12]}"


class AdapterRegistry:
    """Read from the HTTP side, written when experts are added or retired. Keyed by ref (ref_of): names as
    clients write them are resolved by lookup()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, AdapterRecord] = {}
        # names whose registration is in progress -> the experts it blends (a mixture's members, else empty)
        self._reserved: dict[str, frozenset[str]] = {}
        self._requests: Counter[str] = Counter()

    def _blending(self, name: str) -> list[str]:
        """Mixtures, registered or being registered, that blend `name` (under the lock)."""
        registered = [r.ref for r in self._records.values() if any(m == name for m, _ in r.mixture)]
        pending = [other for other, members in self._reserved.items() if name in members]
        return sorted(registered + pending)

    def mixtures_using(self, name: str) -> list[str]:
        """Mixtures that blend `name`, including those whose registration is in progress."""
        with self._lock:
            return self._blending(name)

    def reserve(self, name: str, members: tuple[str, ...] = ()) -> bool:
        """Claim a ref for a registration in progress; False if taken or being registered.

        A mixture names its `members`: they must be registered now (UnregisteredMember otherwise), and
        from here until add() or release() none of them can be retired (retire() refuses), so a
        mixture can never be listed with a member that no longer exists.
        """
        with self._lock:
            if name in self._records or name in self._reserved:
                return False
            missing = sorted(m for m in members if m not in self._records)
            if missing:
                raise UnregisteredMember(missing)
            self._reserved[name] = frozenset(members)
            return True

    def release(self, name: str) -> None:
        with self._lock:
            self._reserved.pop(name, None)

    def retire(self, name: str) -> tuple[AdapterRecord | None, list[str]]:
        """Remove `name` unless a mixture (registered or being registered) blends it, in one step:
        (its record, []) when removed; (None, the mixtures) when refused; (None, []) when not registered."""
        with self._lock:
            users = self._blending(name)
            if users:
                return None, users
            self._requests.pop(name, None)
            return self._records.pop(name, None), []

    def add(self, record: AdapterRecord) -> None:
        with self._lock:
            self._reserved.pop(record.ref, None)
            self._records[record.ref] = record

    def update(self, record: AdapterRecord) -> bool:
        """Replace the record of `record.ref` if it is still the same registration (same key);
        False when that registration was retired meanwhile (the update must not bring it back)."""
        with self._lock:
            current = self._records.get(record.ref)
            if current is None or current.key != record.key:
                return False
            self._records[record.ref] = record
            return True

    def remove(self, name: str) -> AdapterRecord | None:
        with self._lock:
            self._requests.pop(name, None)
            return self._records.pop(name, None)

    def get(self, ref: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.get(ref)

    def usable(self, ref: str, viewer: Viewer | None = None) -> AdapterRecord | None:
        """The expert `ref` if `viewer` may use it (None: anyone), else None."""
        record = self.get(ref)
        return record if record is not None and (viewer is None or viewer.may_use(record.owner)) else None

    def lookup(self, name: str, viewer: Viewer | None = None) -> AdapterRecord | None:
        """The expert a client means by `name`: in a tenant's namespace its own expert of that name, else the
        shared one; None when there is none it may use (another tenant's answers exactly as a name nobody
        registered). viewer None: everything, by ref (the server itself, an admin)."""
        tenant = getattr(viewer, "tenant", None)
        own = self.get(ref_of(name, tenant)) if tenant else None
        return own if own is not None else self.usable(name, viewer)

    def all(self) -> list[AdapterRecord]:
        with self._lock:
            return list(self._records.values())

    def count_request(self, name: str) -> None:
        with self._lock:
            self._requests[name] += 1

    def request_count(self, name: str) -> int:
        with self._lock:
            return self._requests[name]
