"""Who may reach the server: the Host header, the API key, and cross-origin pages.

- Host: a server on a loopback address answers only requests whose Host is a loopback name (localhost,
  127.0.0.1, ::1, any port), so a page on another site cannot reach it through DNS rebinding; a list of
  names may be given for other addresses (`--allowed_hosts`).
- Key: with one or more keys (`--api_key`, `--api_key_file`, MINGPT_API_KEY) every route but `/health` and
  the playground's page needs `Authorization: Bearer KEY` (401 otherwise; compared in constant time).
- CORS: no origin may read the answers unless named (`--cors_origins`); preflights are then answered.
"""
import dataclasses
import hmac
import ipaddress
from typing import Optional, Tuple

from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_ROUTES = ("/health", "/")  # the page holds no answer: it asks for the key and sends it


@dataclasses.dataclass(frozen=True)
class Access:
    api_keys: Tuple[str, ...] = ()
    allowed_hosts: Optional[Tuple[str, ...]] = None  # None: any Host
    cors_origins: Tuple[str, ...] = ()

    def key_ok(self, authorization: str) -> bool:
        scheme, _, given = authorization.partition(" ")
        given = given.strip().encode()
        matches = [hmac.compare_digest(given, key.encode()) for key in self.api_keys]  # every key, every time
        return scheme.lower() == "bearer" and any(matches)

    def host_ok(self, host: str) -> bool:
        return self.allowed_hosts is None or host_name(host) in self.allowed_hosts


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str:
    """The name of a Host header, without its port: "[::1]:8000" -> "::1", "localhost:80" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def read_keys(keys=(), key_file: Optional[str] = None) -> Tuple[str, ...]:
    """The API keys given: each of keys, and each non-empty line of key_file (OSError if unreadable)."""
    found = [k.strip() for k in keys if k and k.strip()]
    if key_file:
        with open(key_file, encoding="utf-8") as f:
            found += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return tuple(found)


def error(status: int, message: str, code: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
                        status_code=status, headers=headers)


def add_access(app, access: Access, metrics):
    """Check Host and key before every route, and count every answer by route and status in the metrics."""

    @app.middleware("http")
    async def guard(http, call_next):
        route = http.url.path if http.url.path in COUNTED_ROUTES else "other"
        if not access.host_ok(http.headers.get("host", "")):
            response = error(400, f"the Host header {http.headers.get('host', '')!r} is not one this server answers "
                                  f"to (--allowed_hosts)", "invalid_host")
        elif access.api_keys and http.url.path not in OPEN_ROUTES and http.method != "OPTIONS" \
                and not access.key_ok(http.headers.get("authorization", "")):
            response = error(401, "this server needs an API key: send Authorization: Bearer KEY",
                             "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(http)
        metrics.requests.labels(route, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(STATUS_KINDS.get(response.status_code, f"http_{response.status_code}")).inc()
        return response

    if access.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(access.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])


COUNTED_ROUTES = ("/v1/completions", "/v1/models", "/v1/model_card", "/tokenize", "/detokenize", "/health",
                  "/metrics", "/")
STATUS_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                408: "body_timeout", 413: "too_large", 415: "not_json", 429: "queue_full", 499: "client_gone",
                500: "server_error", 503: "unavailable"}
