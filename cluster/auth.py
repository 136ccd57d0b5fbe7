"""JWT verification for clients (SPEC §5), shared by nodes and routers.

Only the algorithms on the allow-list are accepted (never ``none``), the key
type must fit the algorithm (an HS256 token is never checked against a public
key), ``exp`` and ``sub`` are required, ``aud``/``iss`` are checked when set.
Failures carry a short metric reason; the token itself is never logged.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from functools import cached_property

import jwt

from cluster.protocol import ErrorCode
from cluster.settings import Settings

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
PLACEHOLDER_MARKERS = ("replace-me", "replaceme", "change-me", "changeme", "placeholder", "your-secret")
"""Words of the example secrets people copy from docs and manifests; no real random secret contains them."""
SECRET_HINT = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
PUBLIC_KEY_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "EdDSA"})
ADMIN_ROLE = "admin"
NO_KEYS = "none"
"""The fingerprint of a verifier without any key: it accepts anonymous clients only."""
FINGERPRINT_ITERATIONS = 100_000
FINGERPRINT_SALT = b"delta-push verifier fingerprint"


class AuthError(Exception):
    """A token was refused: ``code`` is the protocol error, ``reason`` a metric label."""

    def __init__(self, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is: None user_id means anonymous."""

    user_id: str | None
    roles: frozenset[str] = frozenset()
    session_id: str | None = None
    expires_at: int | None = None  # ms

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles


ANONYMOUS = Identity(None)


def _load_key(text: str) -> str:
    if text and "-----BEGIN" not in text and os.path.exists(text):
        with open(text, encoding="utf-8") as handle:
            return handle.read()
    return text


def _allowed_algorithms(settings: Settings) -> tuple[str, ...]:
    """The explicit allow-list, else the defaults of every configured key.

    With both a secret and a public key, HS256 *and* RS256/ES256 are accepted:
    each algorithm is still checked only against its own kind of key.
    """
    if settings.jwt_algorithms:
        return settings.jwt_algorithms
    defaults: list[str] = []
    if settings.jwt_secret:
        defaults.append("HS256")
    if settings.jwt_public_key:
        defaults.extend(("RS256", "ES256"))
    return tuple(defaults)


class TokenVerifier:
    """Verifies client JWTs against one configured key and algorithm allow-list."""

    def __init__(self, settings: Settings) -> None:
        allowed = [a for a in _allowed_algorithms(settings) if a.lower() != "none"]
        self._hmac_algorithms = [a for a in allowed if a in HMAC_ALGORITHMS] if settings.jwt_secret else []
        self._public_algorithms = [a for a in allowed if a in PUBLIC_KEY_ALGORITHMS] if settings.jwt_public_key else []
        self._secret = settings.jwt_secret
        self._public_key = _load_key(settings.jwt_public_key)
        self._audience = settings.jwt_audience or None
        self._issuer = settings.jwt_issuer or None

    def warm_up(self) -> None:
        """Verify one throw-away token so the first real connect does not pay PyJWT's first-use imports."""
        if self._secret:
            self.verify(jwt.encode({"sub": "warm-up", "exp": int(time.time()) + 60}, self._secret, algorithm="HS256"))

    @property
    def configured(self) -> bool:
        return bool(self._hmac_algorithms or self._public_algorithms)

    @cached_property
    def fingerprint(self) -> str:
        """Which tokens this verifier accepts, as 16 hex digits that are safe to publish.

        Nodes put it in the membership and compare it before joining: a node with
        other keys would refuse every user routed to it. It covers the algorithms,
        the keys, audience and issuer; the HMAC secret only through PBKDF2, so the
        digest is slow to guess the secret from and never reveals it.
        """
        if not self.configured:
            return NO_KEYS
        algorithms = ",".join(sorted({*self._hmac_algorithms, *self._public_algorithms}))
        digest = hashlib.sha256("\0".join((algorithms, self._audience or "", self._issuer or "")).encode())
        if self._hmac_algorithms:
            digest.update(
                hashlib.pbkdf2_hmac("sha256", self._secret.encode(), FINGERPRINT_SALT, FINGERPRINT_ITERATIONS)
            )
        if self._public_algorithms:
            digest.update("".join(self._public_key.split()).encode())
        return digest.hexdigest()[:16]

    def verify(self, token: str) -> Identity:
        """Return the token's identity or raise :class:`AuthError`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError(ErrorCode.UNAUTHORIZED, "malformed", "token is not a JWT") from None
        algorithm = header.get("alg")
        if algorithm in self._hmac_algorithms:
            key, algorithms = self._secret, self._hmac_algorithms
        elif algorithm in self._public_algorithms:
            key, algorithms = self._public_key, self._public_algorithms
        else:
            raise AuthError(ErrorCode.UNAUTHORIZED, "algorithm", "token algorithm is not allowed")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self._audience,
                issuer=self._issuer,
                # iat is informational (RFC 7519 §4.1.6): an issuer whose clock runs ahead must not lock users out
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None, "verify_iat": False},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "expired", "token has expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError(ErrorCode.UNAUTHORIZED, "signature", "token signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(ErrorCode.UNAUTHORIZED, "claims", f"token lacks the {exc.claim} claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise AuthError(ErrorCode.UNAUTHORIZED, "claims", "token audience or issuer is not accepted") from None
        except jwt.PyJWTError:
            raise AuthError(ErrorCode.UNAUTHORIZED, "invalid", "token is invalid") from None
        return _identity(claims)


def _identity(claims: dict) -> Identity:
    sub = claims.get("sub")
    if type(sub) is not str or not sub or len(sub) > 256:
        raise AuthError(ErrorCode.UNAUTHORIZED, "claims", "token sub must be a non-empty string")
    roles = claims.get("roles") or []
    if type(roles) is not list or any(type(r) is not str for r in roles):
        raise AuthError(ErrorCode.UNAUTHORIZED, "claims", "token roles must be a list of strings")
    sid = claims.get("sid")
    if sid is not None and type(sid) is not str:
        raise AuthError(ErrorCode.UNAUTHORIZED, "claims", "token sid must be a string")
    exp = claims["exp"]
    return Identity(sub, frozenset(roles), sid, int(exp * 1000))


def weak_secret(secret: str) -> str | None:
    """Why an HS256 secret must not guard a cluster (a placeholder, too short), or None if it may.

    Anyone who knows the secret mints admin tokens, so a copied example or a
    guessable short string is refused at start rather than left running.
    """
    if not secret:
        return None  # no HS256 at all: public keys or anonymous only
    normalized = secret.lower().replace("_", "-").replace(" ", "-")
    if any(marker in normalized for marker in PLACEHOLDER_MARKERS):
        return "PUSH_JWT_SECRET is a placeholder from an example"
    size = len(secret.encode())
    if size < MIN_SECRET_BYTES:
        return f"PUSH_JWT_SECRET is {size} bytes, HS256 needs at least {MIN_SECRET_BYTES}"
    return None


def require_strong_secret(secret: str, program: str) -> None:
    """Exit with one line naming the setting (never the secret) if ``secret`` is weak."""
    problem = weak_secret(secret)
    if problem is not None:
        raise SystemExit(f"{program}: refusing to start: {problem}; set a random one, e.g. {SECRET_HINT}")


def issue_token(
    secret: str,
    sub: str,
    *,
    ttl_seconds: int = 3600,
    roles: list[str] | None = None,
    sid: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A HS256 token for development and tests (``pushctl token``)."""
    if not secret:
        raise ValueError("PUSH_JWT_SECRET is not set: there is no key to sign a token with")
    now = int(time.time())
    claims: dict = {"sub": sub, "iat": now, "exp": now + ttl_seconds, "roles": roles or []}
    if sid:
        claims["sid"] = sid
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
