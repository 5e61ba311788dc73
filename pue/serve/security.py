"""Who may call: the API key, the Host header (DNS rebinding), the bound address."""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from pue.errors import PueError

API_KEY_ENV = "PUE_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_api_key(api_key_file: Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key from `--api-key-file` (first line, stripped) or `PUE_API_KEY`; None when neither is given."""
    environ = os.environ if environ is None else environ
    if api_key_file is not None:
        try:
            lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise PueError(f"cannot read the API key file {api_key_file}: {exc.strerror or exc}") from exc
        key = lines[0].strip() if lines else ""
        if not key:
            raise PueError(f"the API key file {api_key_file} is empty", "write the key on its first line")
        return key
    key = environ.get(API_KEY_ENV, "").strip()
    return key or None


def check_binding(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without a key."""
    if api_key is None and not is_loopback(host):
        raise PueError(
            f"binding {host} makes the server reachable from other machines, and no API key is set",
            f"give one with --api-key-file PATH or the {API_KEY_ENV} environment variable, or bind 127.0.0.1",
        )


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """Host header values (without port) the server answers; None accepts any (a wildcard bind without names).

    A loopback bind answers only loopback names, so a web page whose DNS name is rebound to 127.0.0.1 cannot
    read it from a browser. A specific address answers that address, loopback names and `extra`; a wildcard
    bind (0.0.0.0, ::) answers `extra` and loopback names when given, anything otherwise (the key protects it).
    """
    names = {name.lower().strip("[]") for name in extra}
    host = bind_host.lower().strip("[]")
    if host in ("0.0.0.0", "::"):
        return frozenset(names | set(LOOPBACK_NAMES)) if names else None
    return frozenset(names | set(LOOPBACK_NAMES) | {host})


def host_allowed(header: str | None, allowed: frozenset[str] | None) -> bool:
    if allowed is None:
        return True
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host in allowed


def bearer_matches(header: str | None, api_key: str) -> bool:
    """`Authorization: Bearer KEY`, compared in constant time."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8"), api_key.encode("utf-8"))


def is_json_content_type(value: str | None) -> bool:
    return value is not None and value.split(";")[0].strip().lower() == "application/json"
