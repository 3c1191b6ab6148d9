"""The console's settings: where it listens, who may see it, whether it may change runs."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

from conveyor.settings import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8474
_TRUE = ("1", "true", "yes", "on")
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

    @property
    def auth_required(self) -> bool:
        return self.user is not None

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
