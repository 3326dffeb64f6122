"""Signing in to the console: a signed session cookie and anti-forgery checks.

No server-side session store. The cookie is ``<payload>.<mac>``: the payload is the sign-in time
and a random session id (base64url JSON), the MAC an HMAC-SHA256 under a key derived from the API
token (``HMAC(token, "leveret-console-v1")``), so

* only someone who knew the token can make a valid cookie, and changing the token (a restart
  with a new ``LEVERET_API_TOKEN``) signs every console user out;
* the cookie is ``HttpOnly`` (scripts cannot read it), ``SameSite=Strict`` (a foreign site's
  request does not carry it), ``Path=/ui`` and ``Secure`` when the request came over https;
* it expires after ``SESSION_TTL_S`` (the MAC covers the time, so it cannot be extended).

Every state-changing request (``POST``) must carry the session's anti-forgery token (form field
``csrf`` or header ``X-CSRF-Token``): ``HMAC(key, "csrf:" + session id)``, which a page of ours
embeds and a foreign page cannot read. On top of that its ``Origin`` (or, without one, its
``Referer``) must be this console's own origin: a request with neither is refused too. The
sign-in form has no session yet, so it is checked by origin only.

Without a token (``--insecure-no-auth``) the console is open like the API and the key is random
per process: the anti-forgery checks still apply.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request

COOKIE = "leveret-console"
SESSION_TTL_S = 12 * 3600
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    sid: str
    issued: float


class Signer:
    """Makes and checks session cookies and anti-forgery tokens for one API token."""

    def __init__(self, token: str | None, ttl_s: float = SESSION_TTL_S) -> None:
        self.open = token is None
        secret = token.encode() if token is not None else os.urandom(32)
        self._key = hmac.new(secret, b"leveret-console-v1", hashlib.sha256).digest()
        self._token_digest = hashlib.sha256(secret).digest()
        self.ttl_s = ttl_s

    def _mac(self, data: bytes) -> str:
        return _b64(hmac.new(self._key, data, hashlib.sha256).digest())

    def check_token(self, candidate: str) -> bool:
        """The API token typed into the sign-in form (constant time, no length leak)."""
        if self.open:
            return True
        digest = hashlib.sha256(candidate.strip().encode()).digest()
        return hmac.compare_digest(digest, self._token_digest)

    def new_cookie(self, now: float | None = None) -> str:
        body = json.dumps(
            {"sid": secrets.token_urlsafe(16), "iat": int(now if now is not None else time.time())},
            separators=(",", ":"),
        ).encode()
        payload = _b64(body)
        return f"{payload}.{self._mac(payload.encode())}"

    def session(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie proves, or ``None`` (missing, forged, malformed or expired)."""
        if not cookie or "." not in cookie:
            return None
        payload, _, mac = cookie.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(payload.encode()).encode()):
            return None
        try:
            data = json.loads(_unb64(payload))
            sid, issued = str(data["sid"]), float(data["iat"])
        except (ValueError, KeyError, TypeError):
            return None
        now = now if now is not None else time.time()
        if not (issued - 60 <= now < issued + self.ttl_s):
            return None
        return Session(sid, issued)

    def csrf(self, session: Session) -> str:
        return self._mac(b"csrf:" + session.sid.encode())

    def csrf_ok(self, session: Session, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(
            str(candidate).encode(), self.csrf(session).encode()
        )


def own_origin(request: Request) -> str:
    """``scheme://host[:port]`` of this request as the browser addressed it (the Host header)."""
    host = request.headers.get("host", "")
    return f"{request.url.scheme}://{host}".lower()


def same_origin(request: Request) -> bool:
    """The request's ``Origin`` (else ``Referer``) is this console's origin; neither: refused."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        referer = request.headers.get("referer")
        if not referer:
            return False
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin.lower() == own_origin(request)
