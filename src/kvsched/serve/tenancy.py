"""Tenant isolation of the prefix cache: a request's ``cache_salt`` (body) and tenant (gateway header).

The KV manager scopes every prefix key by ``Request.cache_salt`` (``core/kvcache/keys.py``
``root_key(lora_id, salt)``), so requests with different salts never share a cached block. The core's
salt is a 64-bit int; this module maps the HTTP layer's strings onto it:

- ``cache_salt`` in a completions or chat body (a non-empty string, as vLLM accepts it);
- with ``--tenant-salt-header NAME``, the value of that header, set by a gateway that authenticated the
  tenant. The header wins: it scopes the request, and a body salt only splits the tenant's own scope
  further. Header and body salts are hashed as separate, length-prefixed fields, so no body salt can
  reach another tenant's scope, and requests without either keep the shared, unsalted cache.

The int is the first 8 bytes of a SHA-256 over both fields: two scopes collide with probability about
n² / 2⁶⁵ for n scopes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from hashlib import sha256

from kvsched.core.errors import ConfigError

_DOMAIN = b"kvsched.cache_salt.v1\0"
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP header name (RFC 9110 token)


def check_header_name(name: str) -> str:
    """``--tenant-salt-header``'s value must be a header name; raises ConfigError naming it."""
    if not _TOKEN.match(name):
        raise ConfigError(f"--tenant-salt-header {name!r} is not an HTTP header name")
    return name


def tenant_of(headers: Mapping[str, str], header_name: str | None) -> str | None:
    """The tenant a gateway named in ``header_name`` (case-insensitive); None if unset or empty."""
    if header_name is None:
        return None
    return headers.get(header_name) or None


def salt_id(tenant: str | None, cache_salt: str | None) -> int | None:
    """The core ``cache_salt`` for a request: None (shared cache) when neither is given."""
    if tenant is None and cache_salt is None:
        return None
    h = sha256(_DOMAIN)
    for part in (tenant, cache_salt):
        if part is None:
            h.update(b"\0")
        else:
            data = part.encode("utf-8", "surrogatepass")
            h.update(b"\1" + len(data).to_bytes(8, "little") + data)
    return int.from_bytes(h.digest()[:8], "little")
