"""HTTP Basic auth, cross-site request forgery tokens and the headers every page carries."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REALM = "conveyor console"
USER_KEY = "conveyor.console.user"  # where the authenticated user is kept in the ASGI scope
# Paths a probe may call without credentials; they reveal nothing about runs.
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
    """ASGI middleware: Basic auth when credentials are configured, security headers always."""

    def __init__(self, app: ASGIApp, user: str | None, password: str | None) -> None:
        self.app = app
        self.user = user
        self.password = password

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.user is not None and scope["path"] not in PUBLIC_PATHS:
            if not self._authorized(dict(scope["headers"]).get(b"authorization", b"")):
                await _unauthorized(send)
                return
            scope[USER_KEY] = self.user
        else:
            scope[USER_KEY] = None

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)

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
