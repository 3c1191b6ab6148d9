"""Database URLs as messages may show them, and as libpq will read them. Imports nothing of
conveyor: settings and db both use it."""

from __future__ import annotations

import re

import psycopg
from psycopg import conninfo

# A URL's password runs from "://user:" to the LAST "@" of its word: an unencoded "@" in the
# password (which libpq reads as part of the host) must not end the mask early.
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)\S*@")
# A DSN's password is quoted, or runs up to the next "key=": a malformed value may hold spaces.
# One already masked ("***" before a space, ": " or the end) keeps the text after it.
_DSN_PASSWORD = re.compile(
    r"(password\s*=\s*)('(?:[^'\\\n]|\\.)*'?|\*\*\*(?=:?\s|:?$)|.*?(?=\s+\w+\s*=|$))",
    flags=re.IGNORECASE | re.MULTILINE,
)
# One configured URL: everything up to its last "@" is userinfo, spaces included.
_WHOLE_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:).*@", flags=re.DOTALL)


def redact(text: str) -> str:
    """Hide passwords in a URL or DSN, and anything that quotes one."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _DSN_PASSWORD.sub(r"\1***", text)


def redact_url(url: str) -> str:
    """One configured URL or DSN as a message may show it: its password hidden, however
    malformed the rest."""
    return redact(_WHOLE_URL_PASSWORD.sub(r"\1***@", url))


_URL_FORMAT = (
    "expected postgresql://user:password@host:port/dbname (percent-encode @, :, / and spaces "
    "in the password) or key=value pairs"
)


def url_problem(url: str) -> str | None:
    """What libpq cannot read in a database URL or DSN, as an error may say it (libpq's own
    reason only when the value holds no password: it quotes the fragment it could not read);
    None when the URL is fine."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except (psycopg.Error, ValueError) as exc:  # ValueError: text libpq cannot encode
        reason = f" ({redact(first_line(exc))})" if redact_url(url) == url else ""
        return _URL_FORMAT + reason
    hosts = str(params.get("host") or "").split(",")
    if any("@" in host and not host.startswith("/") for host in hosts):
        return "percent-encode '@' in the password as %40"
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return "expected a port number from 1 to 65535 (percent-encode / in a password as %2F)"
    return None


def first_line(exc: BaseException) -> str:
    """An error's last non-empty line (PostgreSQL puts the gist there), or its type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
