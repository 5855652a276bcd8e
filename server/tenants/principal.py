"""Who is asking: the one visibility rule every endpoint and store applies.

A request's Principal is resolved from its bearer key by server/api/auth.py before the body is read, and
carried in the ASGI scope (`principal_of(scope)`). Every object with an owner (an expert, a registered
mixture, a file, a fine-tuning job, a batch, a stored response) is checked with `may_use` / `may_change`, here and nowhere
else, and an object the caller may not use is answered exactly as if it did not exist (the same 404, the
same words): so an endpoint added later adopts tenancy with one call, `principal_of(request.scope)`, and
one check.
"""
from __future__ import annotations

from dataclasses import dataclass

SHARED = ""  # the owner of what the config or an admin registered: everyone may use it


@dataclass(frozen=True)
class Principal:
    tenant: str | None = None  # the tenant's id; None: not a tenant (an admin, a LORAPLEX_API_KEY key, no key)
    admin: bool = False
    key_id: str | None = None  # the key's public id (never the key): for logs and usage

    @property
    def owner(self) -> str:
        """Who owns what this caller creates: its tenant, else shared."""
        return self.tenant or SHARED

    def may_use(self, owner: str) -> bool:
        """See and use an object owned by `owner`: its own, and shared ones. An admin may use everything."""
        return self.admin or owner == SHARED or owner == self.tenant

    def may_change(self, owner: str) -> bool:
        """Retire, correct or cancel it: a tenant its own objects only; an admin everything."""
        return self.admin or (self.tenant is not None and owner == self.tenant)

    def owns(self, owner: str) -> bool:
        """See a private object (a training file, a fine-tuning job): never shared, so a tenant sees its own
        only, an admin everything."""
        return self.may_change(owner)

    def sees(self, owner: str) -> bool:
        """See a caller's own work that nobody shares (a batch file, a batch, a stored response): a tenant its
        own, an admin everything, a caller without a tenant what was made without one (so a server without
        tenants behaves as before: every key sees them all)."""
        return self.admin or owner == self.owner


OPERATOR = Principal(admin=True)  # the server itself: start-up, fine-tuning runs, the CLI
ANONYMOUS = Principal()  # no tenant: sees shared objects only (all of them while no tenant exists)


def principal_of(scope) -> Principal:
    """The request's principal (set by the auth middleware; ANONYMOUS where it set none)."""
    return scope.get("state", {}).get("principal", ANONYMOUS)
