"""The Host check, HTTP Basic auth, cross-site request forgery tokens and the headers every
response carries, the error page of a failed request included."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("conveyor.console")

REALM = "conveyor console"
USER_KEY = "conveyor.console.user"  # where the authenticated user is kept in the ASGI scope
# Paths a probe may call without credentials or a known Host; they reveal nothing about runs.
PUBLIC_PATHS = frozenset({"/healthz"})
CSRF_FIELD = "csrf_token"
CSRF_MAX_AGE_SECONDS = 12 * 3600

# Scripts and styles only from the console itself: even a value that escaped escaping could not
# run. Widths in the timeline are SVG attributes, not inline styles, so no 'unsafe-inline'.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class ConsoleSecurity:
    """ASGI middleware, outside everything else the console does: the Host check (`hosts`
    None: any), Basic auth when credentials are configured, and security headers always, on
    the answer to a request that failed as well."""

    def __init__(
        self,
        app: ASGIApp,
        user: str | None,
        password: str | None,
        hosts: frozenset[str] | None = None,
    ) -> None:
        self.app = app
        self.user = user
        self.password = password
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        public = scope["path"] in PUBLIC_PATHS
        if self.hosts is not None and not public:
            refusal = host_refusal(scope["headers"], self.hosts)
            if refusal is not None:
                await _plain(send, 400, refusal)
                return
        if self.user is not None and not public:
            if not self._authorized(dict(scope["headers"]).get(b"authorization", b"")):
                await _unauthorized(send)
                return
            scope[USER_KEY] = self.user
        else:
            scope[USER_KEY] = None

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:
            pass
        except Exception:
            # Handled here, not by Starlette's outermost handler, so that the answer carries
            # the headers too; the traceback goes to the log, never to the client.
            log.exception("console request failed", method=scope["method"], path=scope["path"])
            if not started:
                await _server_error(send, scope["path"])

    def _authorized(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        assert self.user is not None and self.password is not None
        # Both compared in constant time, and both always compared.
        user_ok = hmac.compare_digest(user, self.user.encode())
        password_ok = hmac.compare_digest(password, self.password.encode())
        return bool(sep) and user_ok and password_ok


def host_of(header: bytes) -> str | None:
    """The name in a Host header: lower case, without port, brackets or a final dot; None when
    it is not a host name and optional port."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        name, closed, rest = text[1:].partition("]")
        port_ok = bool(closed) and (not rest or (rest[:1] == ":" and rest[1:].isdigit()))
    else:
        name, colon, port = text.partition(":")
        port_ok = not colon or port.isdigit()
    name = name.rstrip(".")
    if not port_ok or not name or not all(c.isalnum() or c in "-._:" for c in name):
        return None
    return name


def host_refusal(headers: Iterable[tuple[bytes, bytes]], hosts: frozenset[str]) -> str | None:
    """Why a request's Host is refused, or None. A page served under another name is how DNS
    rebinding reads a loopback console: a browser only sends the name it resolved."""
    given = [value for name, value in headers if name == b"host"]
    if len(given) != 1:
        return "one Host header is required"
    name = host_of(given[0])
    if name in hosts:
        return None
    shown = ", ".join(f"[{h}]" if ":" in h else h for h in sorted(hosts))
    return (
        f"this console does not answer to the Host {given[0].decode('latin-1')[:100]!r}; it"
        f" answers to {shown} (add names with CONVEYOR_CONSOLE_ALLOWED_HOSTS)"
    )


async def _plain(send: Send, status: int, message: str) -> None:
    await _respond(send, status, b"text/plain; charset=utf-8", (message + "\n").encode())


async def _server_error(send: Send, path: str) -> None:
    message = "internal error: the console's log has the details"
    if path.startswith("/api/"):
        await _respond(send, 500, b"application/json", json.dumps({"error": message}).encode())
    else:
        await _plain(send, 500, message)


async def _respond(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *_HEADERS,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _unauthorized(send: Send) -> None:
    body = b"authentication required\n"
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode()),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def current_user(request: Request) -> str | None:
    user = request.scope.get(USER_KEY)
    return user if isinstance(user, str) else None


class CsrfTokens:
    """Tokens for the action forms: an HMAC of the user and the time of issue under a key only
    this process knows. Another site can make a browser send its Basic credentials, but cannot
    read a page to learn a token; a token from before a restart no longer verifies."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def issue(self, user: str | None) -> str:
        issued = str(int(time.time()))
        return f"{issued}.{self._sign(user, issued)}"

    def verify(self, user: str | None, token: str) -> bool:
        issued, _, signature = token.partition(".")
        if not issued.isdigit() or time.time() - int(issued) > CSRF_MAX_AGE_SECONDS:
            return False
        return hmac.compare_digest(signature, self._sign(user, issued))

    def _sign(self, user: str | None, issued: str) -> str:
        message = f"{user or ''}\n{issued}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


def same_origin(request: Request) -> bool:
    """Browsers say where a request comes from; a cross-site one is refused outright."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")
