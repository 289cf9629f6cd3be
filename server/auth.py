"""Transport security: TLS server credentials and bearer-token authentication with two roles.

Every call to ``paramserve.v1.ParameterServer`` must carry ``authorization: Bearer <token>``
metadata once tokens are configured. A *worker* token may call :data:`WORKER_METHODS` (Push,
Pull, Step, GetStatus, a sharded job's CommitRound and ApplyRound, and the read-only Describe,
which the SDK needs to know variable shapes);
an *admin* token may call everything. Methods not listed in :data:`WORKER_METHODS` need an
admin token, so a new RPC is admin-only until someone classifies it. Health checking and
reflection stay open: probes and tools carry no token.

Tokens come from a tokens file (TOML or JSON, ``{"admin": [...], "worker": [...]}``) that
other users cannot read, and from ``PARAMSERVE_ADMIN_TOKEN`` / ``PARAMSERVE_WORKER_TOKEN``
(comma-separated). They are never logged and are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from paramserve.wire import SERVICE_NAME

from .errors import ParamServeError, PermissionDenied, Unauthenticated
from .settings import ConfigError
from .status import grpc_status

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

WORKER = "worker"
ADMIN = "admin"
ROLES = (WORKER, ADMIN)
# What a training worker needs; everything else of the service is admin-only.
WORKER_METHODS = frozenset(
    {"Push", "Pull", "Step", "GetStatus", "Describe", "CommitRound", "ApplyRound"}
)
# Services anyone may call: probes (grpc_health_probe, Kubernetes) and grpcurl carry no token.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
TOKEN_ENV = {ADMIN: "PARAMSERVE_ADMIN_TOKEN", WORKER: "PARAMSERVE_WORKER_TOKEN"}
_SCHEME = "bearer"


class SecurityConfigError(ConfigError):
    """A tokens file, token or certificate that cannot be used (unreadable, exposed, malformed)."""


def check_token(token: str, source: str) -> str:
    """``token`` if usable: non-empty, printable, no whitespace or commas."""
    if not token or not token.isprintable() or any(c.isspace() or c == "," for c in token):
        raise SecurityConfigError(
            f"{source}: a token must be a non-empty string without whitespace or commas"
        )
    return token


def read_secret_file(path: str | os.PathLike[str]) -> str:
    """The text of a file holding secrets; refused if other users may read or write it."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IROTH | stat.S_IWOTH):
            raise SecurityConfigError(
                f"{str(path)!r} is accessible to other users (mode {stat.S_IMODE(mode):04o}); "
                f"it holds tokens: run `chmod 600 {path}` (or 640 for a group)"
            )
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {str(path)!r}: {exc.strerror}") from None


@dataclass(frozen=True)
class Tokens:
    """The accepted tokens of each role. Its repr never shows a token."""

    admin: tuple[str, ...] = ()
    worker: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"Tokens(admin=<{len(self.admin)} tokens>, worker=<{len(self.worker)} tokens>)"

    @property
    def enabled(self) -> bool:
        """True when any token is configured (authentication is on)."""
        return bool(self.admin or self.worker)

    def merge(self, other: Tokens) -> Tokens:
        tokens = Tokens(
            admin=tuple(dict.fromkeys(self.admin + other.admin)),
            worker=tuple(dict.fromkeys(self.worker + other.worker)),
        )
        if set(tokens.admin) & set(tokens.worker):
            raise SecurityConfigError(
                "a token is configured as both admin and worker; give each one role"
            )
        return tokens


def tokens_from_mapping(data: Mapping[str, Any], source: str) -> Tokens:
    """Tokens from ``{"admin": [...], "worker": [...]}`` (a single string is one token)."""
    unknown = sorted(set(data) - set(ROLES))
    if unknown:
        raise SecurityConfigError(f"{source}: unknown role(s) {unknown}; expected {list(ROLES)}")
    found: dict[str, tuple[str, ...]] = {}
    for role in ROLES:
        value = data.get(role, [])
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise SecurityConfigError(f"{source}: `{role}` must be a token or a list of tokens")
        found[role] = tuple(check_token(v, f"{source}: `{role}`") for v in values)
    return Tokens().merge(Tokens(admin=found[ADMIN], worker=found[WORKER]))


def load_tokens_file(path: str | os.PathLike[str]) -> Tokens:
    """Tokens from a TOML file (``admin = ["..."]``) or, for a ``.json`` name, a JSON object."""
    text = read_secret_file(path)
    source = f"tokens file {str(path)!r}"
    try:
        data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        # The parser's message may quote the file, i.e. a token: give only the position.
        where = getattr(exc, "lineno", None)
        raise SecurityConfigError(f"{source} is not valid: parse error near line {where}") from None
    if not isinstance(data, dict):
        raise SecurityConfigError(
            f'{source} must map roles to tokens: {{"admin": [...], "worker": [...]}}'
        )
    tokens = tokens_from_mapping(data, source)
    if not tokens.enabled:  # an empty file must not silently turn authentication off
        raise SecurityConfigError(f"{source} holds no tokens; add `admin = [...]` and/or `worker`")
    return tokens


def resolve_tokens(
    *,
    tokens_file: str | os.PathLike[str] | None,
    admin: Sequence[str] = (),
    worker: Sequence[str] = (),
) -> Tokens:
    """All tokens of a server: those given (from the environment) plus the tokens file's."""
    tokens = Tokens().merge(
        Tokens(
            admin=tuple(check_token(t, TOKEN_ENV[ADMIN]) for t in admin),
            worker=tuple(check_token(t, TOKEN_ENV[WORKER]) for t in worker),
        )
    )
    if tokens_file is not None:
        tokens = tokens.merge(load_tokens_file(tokens_file))
    return tokens


def required_role(method: str) -> str | None:
    """The role a full method name (``/package.Service/Method``) needs; None when open."""
    service, _, name = method.lstrip("/").partition("/")
    if service in OPEN_SERVICES:
        return None
    if service == SERVICE_NAME and name in WORKER_METHODS:
        return WORKER
    return ADMIN


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever was sent.
    return hashlib.sha256(token.encode("utf-8")).digest()


def _denying_handler(
    handler: grpc.RpcMethodHandler, status: grpc.Status, log: Callable[..., None]
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with ``status``."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        log(context.peer())
        context.abort_with_status(status)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token of every call against the role its method needs."""

    def __init__(
        self, tokens: Tokens, *, on_denied: Callable[[str, str], None] | None = None
    ) -> None:
        """``on_denied(method_name, code_name)`` is called for every refused call (metrics)."""
        if not tokens.enabled:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._roles = [(_digest(t), ADMIN) for t in tokens.admin]
        self._roles += [(_digest(t), WORKER) for t in tokens.worker]
        self._on_denied = on_denied

    @staticmethod
    def _bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """The bearer token the call presents; None when it sends none."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(value, str):
            return None
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != _SCHEME or not token.strip():
            return None
        return token.strip()

    def _role_of(self, token: str | None) -> str | None:
        """The role of the presented token; None when there is none or it is unknown."""
        if token is None:
            return None
        presented = _digest(token)
        role = None
        for digest, candidate in self._roles:  # no early exit: time does not depend on a match
            if hmac.compare_digest(digest, presented) and role is None:
                role = candidate
        return role

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        needed = required_role(method)
        handler = continuation(handler_call_details)
        if needed is None or handler is None:
            return handler  # open service, or an unknown method (UNIMPLEMENTED)
        name = method.rsplit("/", 1)[-1]
        token = self._bearer_token(handler_call_details.invocation_metadata)
        role = self._role_of(token)
        error: ParamServeError
        if role is None:
            error = Unauthenticated(
                f"{name} needs a valid bearer token: send `authorization: Bearer <token>` "
                "metadata (Client(token=...), $PARAMSERVE_TOKEN or `--token-file`); the token "
                "was missing or is not one of this server's tokens",
                reason="MISSING_TOKEN" if token is None else "UNKNOWN_TOKEN",
                metadata={"method": name},
            )
        elif needed == ADMIN and role != ADMIN:
            error = PermissionDenied(
                f"{name} needs an admin token; this is a worker token, which may call only "
                f"{', '.join(sorted(WORKER_METHODS))}",
                reason="ADMIN_ONLY",
                metadata={"method": name, "role": role},
            )
        else:
            return handler
        status = grpc_status(error, name)
        code = status.code

        def log(peer: str) -> None:
            logger.warning(
                "refused %s from %s: %s",
                name,
                peer,
                code.name,
                extra={"event": "auth_refused", "method": name, "code": code.name},
            )
            if self._on_denied is not None:
                self._on_denied(name, code.name)

        return _denying_handler(handler, status, log)


def server_credentials(
    *,
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    client_ca: str | os.PathLike[str] | None = None,
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca``, clients must present a certificate
    it signed (mutual TLS)."""

    def read(path: str | os.PathLike[str], what: str) -> bytes:
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise SecurityConfigError(
                f"cannot read the {what} {str(path)!r}: {exc.strerror}"
            ) from None

    root = read(client_ca, "client CA (tls_client_ca)") if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(read(key, "TLS key (tls_key)"), read(cert, "TLS certificate (tls_cert)"))],
        root_certificates=root,
        require_client_auth=root is not None,
    )
