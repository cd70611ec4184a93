"""Who may do what, on both ports: API keys, the admin role, and tenants for cache salting.

With no keys configured everything is open (a loopback development server). Once any key is
configured every request must carry one, except the health probes. Inference keys reach the
inference routes; the operations routes (model load/unload, feedback export, adapters) need an
admin key, and with no admin key configured they are closed. Keys are compared in constant time
and never logged; a tenant is a digest of the key, never the key itself.
"""

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import Forbidden, Unauthorized

INFERENCE, ADMIN = "inference", "admin"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its role, the tenant its prefix-cache entries belong to (set when
    the server salts the cache by key), and the owner of the records it stores (stored
    completions, responses, files, feedback): a digest of its key, None on a server without keys."""

    role: str
    tenant: str | None = None
    owner: str | None = None

    def require_admin(self) -> None:
        if self.role != ADMIN:
            raise Forbidden("this operation needs the admin API key")


class AccessPolicy:
    """The keys a server accepts; `authenticate` maps a presented key to a Principal or raises 401.

    Example:
        policy = AccessPolicy(api_keys=["k1", "k2"], admin_keys=["root"], salt_by_key=True)
        policy.authenticate("k1").role       # "inference"
        policy.authenticate("nope")          # raises Unauthorized
    """

    def __init__(self, api_keys: Iterable[str] = (), admin_keys: Iterable[str] = (), salt_by_key: bool = False):
        self.api_keys = [k.encode() for k in api_keys if k]
        self.admin_keys = [k.encode() for k in admin_keys if k]
        self.salt_by_key = salt_by_key

    @property
    def required(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    def authenticate(self, key: str | None) -> Principal:
        if not self.required:
            return Principal(ADMIN)
        if not key:
            raise Unauthorized("an API key is required")
        given = key.encode()
        # Compare with every key (no early exit), so timing tells nothing of which nearly matched.
        admin = [hmac.compare_digest(given, k) for k in self.admin_keys]
        inference = [hmac.compare_digest(given, k) for k in self.api_keys]
        if not any(admin) and not any(inference):
            raise Unauthorized("the API key is not valid")
        digest = hashlib.sha256(b"pyserve-tenant\0" + given).hexdigest()
        return Principal(ADMIN if any(admin) else INFERENCE, digest if self.salt_by_key else None, digest)

    def __repr__(self) -> str:  # never the keys themselves
        return (f"AccessPolicy({len(self.api_keys)} inference key(s), {len(self.admin_keys)} admin key(s), "
                f"salt_by_key={self.salt_by_key})")


def read_key_file(path: str) -> list[str]:
    """Keys one per line; blank lines and lines starting with # are skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
