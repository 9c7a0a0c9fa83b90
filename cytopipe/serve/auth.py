"""Accounts, passwords, sessions, CSRF tokens, roles and the login rate limit.

Passwords: argon2id (salted, slow; argon2-cffi's defaults). Sessions: a random token in an
HttpOnly, SameSite=Strict cookie (Secure over TLS); the database keeps only its sha256, with
the session's CSRF token, which every form (hidden ``csrf`` field) and every state-changing
JSON call (``X-CSRF-Token`` header) must echo.

Roles grant permissions (:data:`PERMISSIONS`); routes ask for a permission, not a role, so the
review issue adds ``review`` / ``signoff`` rows without touching the routes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session as DBSession

from cytopipe.errors import RequestError
from cytopipe.serve import audit
from cytopipe.serve.db import ROLES, Session, User, utcnow

COOKIE = "cytopipe_session"
SESSION_HOURS = 12
PERMISSIONS: dict[str, frozenset[str]] = {
    "view": frozenset(ROLES),
    "study.create": frozenset({"analyst", "reviewer", "admin"}),
    "upload": frozenset({"analyst", "reviewer", "admin"}),
    "map": frozenset({"analyst", "reviewer", "admin"}),
    "run": frozenset({"analyst", "reviewer", "admin"}),
    "review": frozenset({"reviewer", "admin"}),
    "signoff": frozenset({"reviewer"}),
    "policy": frozenset({"admin"}),  # a study's sign-off rule (four eyes)
    "accounts": frozenset({"admin"}),
}
_hasher = PasswordHasher()
_dummy: str | None = None  # dummy_hash(), once made
_dummy_lock = threading.Lock()


def dummy_hash() -> str:
    """The hash a sign-in of an unknown or inactive account is checked against: the same work as a
    real account's (no user enumeration by timing). Made on first use, not on import: a command that
    signs a known account in (``cytopipe review``) does not pay one argon2 hash (~0.2 s of CPU) for
    it; the server makes it as it starts (:func:`cytopipe.serve.app.create_app`)."""
    global _dummy
    with _dummy_lock:
        if _dummy is None:
            _dummy = _hasher.hash("not a password")
        return _dummy


class AuthError(RequestError):
    """Not signed in, or the account's role does not allow the action (HTTP 401 / 403)."""


def allowed(role: str, permission: str) -> bool:
    return role in PERMISSIONS.get(permission, frozenset())


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password_strength(password: str) -> None:
    if len(password) < 10:
        raise AuthError(400, "a password needs at least 10 characters")


def create_user(db: DBSession, name: str, password: str, role: str, by: str) -> User:
    name = name.strip()
    if not name or len(name) > 64 or any(not (c.isalnum() or c in "._-@") for c in name):
        raise AuthError(400, f"user name {name!r}: use 1-64 letters, digits, '.', '_', '-' or '@'")
    if role not in ROLES:
        raise AuthError(400, f"role {role!r} is unknown; choose one of {', '.join(ROLES)}")
    check_password_strength(password)
    if db.scalar(select(User).where(User.name == name)) is not None:
        raise AuthError(409, f"user {name!r} exists already")
    user = User(name=name, password_hash=hash_password(password), role=role, active=True)
    db.add(user)
    db.flush()
    audit.record(db, by, "account.create", "user", user.id, None, {"name": name, "role": role})
    return user


def count_users(db: DBSession) -> int:
    return int(db.scalar(select(func.count()).select_from(User)) or 0)


def authenticate(db: DBSession, name: str, password: str) -> User | None:
    user = db.scalar(select(User).where(User.name == name))
    try:
        if user is None or not user.active:
            _hasher.verify(dummy_hash(), password + "x")
            return None
        _hasher.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def start_session(db: DBSession, user: User) -> tuple[str, Session]:
    token = secrets.token_urlsafe(32)
    now = utcnow()
    db.execute(delete(Session).where(Session.expires_at < now))
    row = Session(
        token_hash=_token_hash(token),
        user_id=user.id,
        csrf=secrets.token_urlsafe(32),
        created_at=now,
        expires_at=now + dt.timedelta(hours=SESSION_HOURS),
    )
    db.add(row)
    return token, row


def lookup_session(db: DBSession, token: str | None) -> tuple[User, Session] | None:
    if not token or len(token) > 100:
        return None
    row = db.get(Session, _token_hash(token))
    if row is None or row.expires_at < utcnow():
        return None
    user = db.get(User, row.user_id)
    if user is None or not user.active:
        return None
    return user, row


def end_session(db: DBSession, token: str | None) -> None:
    if token:
        db.execute(delete(Session).where(Session.token_hash == _token_hash(token)))


def csrf_ok(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(session.csrf.encode(), str(given).encode())


class RateLimiter:
    """At most ``limit`` failed logins per user name, and ``4 * limit`` per client address (a lab
    behind one proxy shares an address), in ``window`` seconds."""

    def __init__(self, limit: int = 5, window: float = 300.0):
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures[key]
        while q and q[0] < now - self.window:
            q.popleft()
        return q

    def blocked(self, name: str, client: str) -> float:
        """Seconds until a login may be tried again (0: allowed)."""
        now = time.monotonic()
        with self._lock:
            waits = []
            for key, limit in ((f"user:{name.lower()}", self.limit), (f"ip:{client}", 4 * self.limit)):
                q = self._recent(key, now)
                if len(q) >= limit:
                    waits.append(q[0] + self.window - now)
            return max(waits, default=0.0)

    def failed(self, name: str, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (f"user:{name.lower()}", f"ip:{client}"):
                self._failures[key].append(now)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(f"user:{name.lower()}", None)
