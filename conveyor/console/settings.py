"""The console's settings: where it listens, who may see it, whether it may change runs.

From the environment (command-line flags win):

- CONVEYOR_CONSOLE_BIND (`--bind`): HOST:PORT, default 127.0.0.1:8474. A non-loopback address
  needs CONVEYOR_CONSOLE_USER and CONVEYOR_CONSOLE_PASSWORD, or `--no-auth` behind a proxy that
  authenticates.
- CONVEYOR_CONSOLE_ACTIONS (`--allow-actions`): retry and cancel from the page; off by default.
- CONVEYOR_CONSOLE_ALLOWED_HOSTS: host names (or addresses) the console answers to besides
  localhost, 127.0.0.1, [::1] and the address it is bound to, comma-separated; `*` for any.
  Without credentials every request must name one of them in its Host header (anything else is
  a 400): a web page under another name, resolved to 127.0.0.1 (DNS rebinding), can neither
  read runs nor act on them. With credentials any Host is accepted unless this is set (a
  browser never sends a console's credentials to another name).
- CONVEYOR_CONSOLE_TRUSTED_PROXIES: addresses or networks (10.0.0.0/8) of proxies whose
  X-Forwarded-For names the client, comma-separated; `*` for any peer. Empty by default: the
  action log records the address of the socket's peer, never a header a client can set.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from conveyor.settings import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8474
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_TRUE = ("1", "true", "yes", "on")
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class ConsoleSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    user: str | None = None
    password: str | None = None
    allow_actions: bool = False
    # Listen on a non-loopback address without credentials: only behind an authenticating proxy.
    no_auth: bool = False
    bind_from: str = "CONVEYOR_CONSOLE_BIND"  # where host and port came from, for errors
    allowed_hosts: tuple[str, ...] = ()  # beyond loopback and the bound address; "*": any
    trusted_proxies: tuple[str, ...] = ()  # whose X-Forwarded-For is believed; "*": any peer

    @property
    def auth_required(self) -> bool:
        return self.user is not None

    @property
    def accepted_hosts(self) -> frozenset[str] | None:
        """Names a request's Host may give (lower case, no port or brackets); None: any."""
        if "*" in self.allowed_hosts or (self.auth_required and not self.allowed_hosts):
            return None
        return frozenset({*LOOPBACK_NAMES, self.host.lower(), *self.allowed_hosts})

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        bind: str | None = None,
        allow_actions: bool = False,
        no_auth: bool = False,
    ) -> ConsoleSettings:
        """Environment first, command-line flags over it; refuses an open, unauthenticated bind."""
        env = os.environ if env is None else env
        if bind is not None:
            host, port = parse_bind("--bind", bind)
        else:
            raw = (env.get("CONVEYOR_CONSOLE_BIND") or "").strip()
            host, port = (
                parse_bind("CONVEYOR_CONSOLE_BIND", raw) if raw else (DEFAULT_HOST, DEFAULT_PORT)
            )
        user = (env.get("CONVEYOR_CONSOLE_USER") or "").strip() or None
        password = env.get("CONVEYOR_CONSOLE_PASSWORD") or None
        if (user is None) != (password is None):
            missing = "CONVEYOR_CONSOLE_PASSWORD" if password is None else "CONVEYOR_CONSOLE_USER"
            raise ConfigError(
                missing, "", "set both CONVEYOR_CONSOLE_USER and _PASSWORD, or neither"
            )
        if user is not None and ":" in user:
            raise ConfigError("CONVEYOR_CONSOLE_USER", user, "HTTP Basic user names hold no ':'")
        settings = cls(
            host=host,
            port=port,
            user=user,
            password=password,
            allow_actions=allow_actions or parse_flag(env, "CONVEYOR_CONSOLE_ACTIONS"),
            no_auth=no_auth,
            bind_from="--bind" if bind is not None else "CONVEYOR_CONSOLE_BIND",
            allowed_hosts=parse_hosts(env, "CONVEYOR_CONSOLE_ALLOWED_HOSTS"),
            trusted_proxies=parse_proxies(env, "CONVEYOR_CONSOLE_TRUSTED_PROXIES"),
        )
        if not is_loopback(host) and not settings.auth_required and not no_auth:
            raise ConfigError(
                settings.bind_from,
                settings.bind,
                "a non-loopback address needs CONVEYOR_CONSOLE_USER and CONVEYOR_CONSOLE_PASSWORD"
                " (or --no-auth behind an authenticating proxy)",
            )
        return settings


def parse_bind(variable: str, raw: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (loopback); port 0 picks a free one."""
    accepted = f"expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT}"
    text = raw.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
        if ":" in host:  # an IPv6 address must be bracketed to carry a port
            raise ConfigError(variable, raw, accepted)
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(variable, raw, accepted)
    host = host or DEFAULT_HOST
    if not _valid_host(host):
        raise ConfigError(variable, raw, accepted)
    return host, int(port_text)


def parse_hosts(env: Mapping[str, str], variable: str) -> tuple[str, ...]:
    """'console.example.com, 10.0.0.5, [fd00::1]' -> names as a Host header gives them."""
    raw = env.get(variable) or ""
    names = []
    for item in _items(raw):
        name = item.lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
            valid = _is_address(name)
        else:
            valid = name == "*" or _is_address(name) or _HOST_NAME.match(name) is not None
        if not valid:
            raise ConfigError(
                variable, raw, "expected host names or addresses without ports, comma-separated"
            )
        names.append(name)
    return tuple(names)


def parse_proxies(env: Mapping[str, str], variable: str) -> tuple[str, ...]:
    """'10.0.0.7, 10.1.0.0/16' -> proxies' addresses and networks, as uvicorn takes them."""
    raw = env.get(variable) or ""
    proxies = []
    for item in _items(raw):
        if item != "*":
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(
                    variable, raw, "expected IP addresses or networks (10.0.0.0/8), or *"
                ) from None
        proxies.append(item)
    return tuple(proxies)


def _items(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def parse_flag(env: Mapping[str, str], variable: str) -> bool:
    raw = (env.get(variable) or "").strip().lower()
    if raw in ("", *_FALSE):
        return False
    if raw in _TRUE:
        return True
    raise ConfigError(variable, raw, "expected 1/true/yes/on or 0/false/no/off")


def is_loopback(host: str) -> bool:
    """Only a literal loopback address or 'localhost' counts; any other name may be public."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        labels = host.split(".")
        return all(label and label.replace("-", "").isalnum() for label in labels)
