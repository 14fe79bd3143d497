"""The console's HTTP server: authenticate, authorise, fetch, render.

``Console.handle`` turns one request into one ``Response`` and holds every rule (tests call it
with a fake cluster); ``run_server`` wraps it in a stdlib ``ThreadingHTTPServer``.

Authentication: a bearer token (``Authorization`` header, or the ``ft_token`` cookie the login
form sets: HttpOnly, SameSite=Strict) checked by TokenReview. Authorisation: the
SubjectAccessReviews of ``ftconsole.authz`` for every page, fragment and label. Answers of both
are cached briefly (``AUTH_CACHE_SECONDS``) so a page with live refresh does not send a review
per request; a revoked permission therefore takes effect within that time.

Writes (POST /api/labels) must carry ``X-Requested-With: ftconsole`` and a JSON body: a browser
sends neither cross-site without a CORS preflight, which this server never grants, and the
cookie is SameSite=Strict -- two independent guards against cross-site request forgery.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import ValidationError

from ftconsole import LABEL_PLURAL, authz, labels, pages
from ftconsole.authz import Access
from ftconsole.history import candidate_pairs, open_round, parse_history, round_pairs
from ftconsole.kube import User

COOKIE = "ft_token"
AUTH_CACHE_SECONDS = 10.0
MAX_BODY_BYTES = 256 * 1024
SECURITY_HEADERS = {
    # No inline script or style anywhere: model output that slipped through escaping could not run.
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.body.decode()


def html_response(status: int, text: str, **headers: str) -> Response:
    return Response(status, text.encode(), headers=dict(headers))


def json_response(status: int, payload: Any) -> Response:
    return Response(status, json.dumps(payload).encode(), content_type="application/json")


class _TtlCache:
    def __init__(self, *, seconds: float, clock: Callable[[], float], limit: int = 10_000):
        self.seconds, self.clock, self.limit = seconds, clock, limit
        self._items: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        now = self.clock()
        with self._lock:
            hit = self._items.get(key)
            if hit and now - hit[0] < self.seconds:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._items) >= self.limit:
                self._items.clear()  # bounded memory; entries are cheap to recompute
            self._items[key] = (now, value)
        return value


def _static(name: str) -> bytes:
    return resources.files("ftconsole").joinpath("static", name).read_bytes()


class Console:
    """Request handling; ``kube`` is a ``ftconsole.kube.ConsoleKube`` (or a fake with its methods)."""

    def __init__(self, *, kube: Any, namespaces: list[str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 secure_cookie: bool = False):
        self.kube = kube
        self.namespaces = namespaces
        self.wall_clock = wall_clock
        self.secure_cookie = secure_cookie
        self._tokens = _TtlCache(seconds=AUTH_CACHE_SECONDS, clock=clock)
        self._reviews = _TtlCache(seconds=AUTH_CACHE_SECONDS, clock=clock)
        self._static = {"console.js": (_static("console.js"), "text/javascript; charset=utf-8"),
                        "console.css": (_static("console.css"), "text/css; charset=utf-8")}

    # -- identity
    def user_of(self, token: str | None) -> User | None:
        if not token:
            return None
        key = hashlib.sha256(token.encode()).hexdigest()  # never keep tokens as cache keys
        return self._tokens.get(key, lambda: self.kube.token_review(token))

    def allowed(self, user: User, access: Access) -> bool:
        key = (user.username, user.uid, tuple(user.groups), access)
        return self._reviews.get(key, lambda: self.kube.access_review(
            user, namespace=access.namespace, verb=access.verb, resource=access.resource,
            group=access.group, name=access.name))

    def _forbidden(self, user: User, accesses: list[Access]) -> Access | None:
        return next((a for a in accesses if not self.allowed(user, a)), None)

    # -- dispatch
    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Response:
        url = urlsplit(target)
        parts = [unquote(p) for p in url.path.split("/") if p]
        if url.path == "/healthz":
            return Response(200, b"ok", content_type="text/plain")
        if parts[:1] == ["static"] and len(parts) == 2 and parts[1] in self._static:
            content, kind = self._static[parts[1]]
            return Response(200, content, content_type=kind)
        if url.path == "/login":
            return self.login(method, body)
        if url.path == "/logout":
            return html_response(303, "", Location="/login",
                                 **{"Set-Cookie": f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"})

        lower = {k.lower(): v for k, v in headers.items()}
        token = authz.bearer_token(authorization=lower.get("authorization"), cookie=lower.get("cookie"),
                                   cookie_name=COOKIE)
        user = self.user_of(token)
        is_api = parts[:1] in (["api"], ["fragment"]) or parts[-1:] == ["fragment"]
        if user is None:
            message = "log in with a Kubernetes token" if token is None else "the token was not accepted (TokenReview)"
            if is_api:
                return json_response(401, {"error": message})
            return html_response(303, "", Location="/login")

        if method == "POST" and url.path == "/api/labels":
            return self.create_label(user, lower, body)
        if method != "GET":
            return json_response(405, {"error": f"{method} {url.path} is not supported"})
        if not parts:
            return self.runs(user, fragment=False)
        if parts == ["fragment", "runs"]:
            return self.runs(user, fragment=True)
        if parts[0] == "runs" and len(parts) in (3, 4):
            namespace, name = parts[1], parts[2]
            tail = parts[3] if len(parts) == 4 else None
            if tail is None or tail == "fragment":
                return self.run(user, namespace, name, fragment=tail == "fragment")
            if tail == "label":
                return self.label(user, namespace, name)
        return html_response(404, pages.error_page(status=404, message=f"no page {url.path}", user=user.username))

    # -- pages
    def login(self, method: str, body: bytes) -> Response:
        if method != "POST":
            return html_response(200, pages.login_page())
        token = (parse_qs(body.decode(errors="replace")).get("token") or [""])[0].strip()
        if self.user_of(token) is None:
            return html_response(401, pages.login_page(error="The cluster did not accept this token (TokenReview)."))
        secure = "; Secure" if self.secure_cookie else ""
        return html_response(303, "", Location="/",
                             **{"Set-Cookie": f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}"})

    def runs(self, user: User, *, fragment: bool) -> Response:
        runs = self.kube.list_runs(self.namespaces)
        present = {(r.get("metadata") or {}).get("namespace", "") for r in runs}
        readable = authz.readable_namespaces(present, lambda access: self.allowed(user, access))
        shown = sorted((r for r in runs if (r.get("metadata") or {}).get("namespace") in readable),
                       key=lambda r: (r["metadata"].get("namespace", ""), r["metadata"].get("name", "")))
        hidden = len(present - readable)
        if fragment:
            return html_response(200, pages.runs_table(shown, hidden_namespaces=hidden))
        return html_response(200, pages.runs_page(shown, user=user.username, hidden_namespaces=hidden))

    def _deny(self, user: User, access: Access, *, api: bool = False) -> Response:
        what = f"{access.verb} {access.resource}" + (f" {access.name}" if access.name else "")
        message = f"{user.username} may not {what} in namespace {access.namespace} (SubjectAccessReview)"
        if api:
            return json_response(403, {"error": message})
        return html_response(403, pages.error_page(status=403, message=message, user=user.username))

    def _run_or_404(self, user: User, namespace: str, name: str) -> dict[str, Any] | Response:
        run = self.kube.get_run(namespace, name)
        if run is None:
            return html_response(404, pages.error_page(status=404, message=f"no FineTuneRun {namespace}/{name}",
                                                       user=user.username))
        return run

    def _history(self, run: dict[str, Any]):
        from ftoperator import naming  # the operator's own name for the ConfigMap, so they cannot drift

        meta = run["metadata"]
        return parse_history(self.kube.config_map_data(meta["namespace"], naming.history_config_map_name(meta["name"])))

    def run(self, user: User, namespace: str, name: str, *, fragment: bool) -> Response:
        denied = self._forbidden(user, authz.read_run(namespace, name))
        if denied:
            return self._deny(user, denied, api=fragment)
        run = self._run_or_404(user, namespace, name)
        if isinstance(run, Response):
            return run
        history = self._history(run)
        if fragment:
            return html_response(200, pages.run_live(run, history))
        count = None
        if self.allowed(user, Access("list", LABEL_PLURAL, namespace)):
            count = len(self.kube.list_labels(namespace, run=name))
        return html_response(200, pages.run_page(run, history, user=user.username, label_count=count))

    def label(self, user: User, namespace: str, name: str) -> Response:
        denied = self._forbidden(user, authz.label_page(namespace, name))
        if denied:
            return self._deny(user, denied)
        run = self._run_or_404(user, namespace, name)
        if isinstance(run, Response):
            return run
        found = self.kube.list_labels(namespace, run=name)
        current = open_round(run)
        if current is None:  # no human-feedback round waits: earliest and latest held-out answers
            pairs = candidate_pairs(self._history(run).samples)
            return html_response(200, pages.label_page(namespace=namespace, run=name, pairs=pairs,
                                                       existing=len(found), user=user.username))
        from ftoperator import naming  # the operator's own name for the round's ConfigMap

        number = current["round"]
        pairs = round_pairs(self.kube.config_map_data(namespace, naming.feedback_config_map_name(name, number)))
        in_round = [label for label in labels.run_labels(found, run=name, rounds=[number])]
        counted = labels.preferences_per_round(in_round).get(number, 0)
        return html_response(200, pages.label_page(namespace=namespace, run=name, pairs=pairs, existing=len(in_round),
                                                   user=user.username, round_=number, counted=counted,
                                                   needed=current.get("needed")))

    # -- writes
    def create_label(self, user: User, headers: dict[str, str], body: bytes) -> Response:
        if headers.get("x-requested-with") != "ftconsole" or not headers.get("content-type", "").startswith(
                "application/json"):
            return json_response(403, {"error": "labels are sent by the console page (X-Requested-With and JSON)"})
        if len(body) > MAX_BODY_BYTES:
            return json_response(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
        try:
            payload = json.loads(body)
            namespace, run = str(payload["namespace"]), str(payload["run"])
        except (ValueError, KeyError, TypeError):
            return json_response(400, {"error": "expected JSON with namespace, run, prompt, responses, choice"})
        denied = self._forbidden(user, authz.write_label(namespace, run))
        if denied:
            return self._deny(user, denied, api=True)
        try:
            spec = labels.PreferenceLabelSpec(
                run=run, round=int(payload.get("round") or 0), prompt=payload.get("prompt"),
                responses=payload.get("responses"), choice=payload.get("choice"),
                labeller=user.username, labelled_at=self.wall_clock().strftime("%Y-%m-%dT%H:%M:%SZ"))
        except (ValidationError, TypeError, ValueError) as exc:
            return json_response(400, {"error": str(exc)})
        try:
            created = self.kube.create_label(labels.label_object(spec, namespace=namespace))
        except Exception as exc:  # the API server refused it: the page shows why (JSON, not the HTML error page)
            code = getattr(exc, "status", None)
            reason = _api_message(exc)
            print(f"console: creating a PreferenceLabel in {namespace} for {run}: {reason}", file=sys.stderr,
                  flush=True)
            return json_response(code if isinstance(code, int) and 400 <= code < 500 else 502,
                                 {"error": f"the API server did not store the label: {reason}"})
        return json_response(201, {"name": (created.get("metadata") or {}).get("name")})


def _api_message(exc: Exception) -> str:
    """The API server's own message from a refusal (kubernetes ApiException's JSON body), else the exception."""
    body = getattr(exc, "body", None)
    try:
        return str(json.loads(body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc)


def handler_class(console: Console) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "ftconsole"

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                response = json_response(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            else:
                body = self.rfile.read(length) if length else b""
                try:
                    response = console.handle(method, self.path, dict(self.headers.items()), body)
                except Exception as exc:  # the API server failed us: say so, keep serving
                    print(f"console: {method} {self.path}: {exc!r}", file=sys.stderr, flush=True)
                    response = html_response(502, pages.error_page(status=502, message=f"cluster request failed: {exc}"))
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for key, value in {**SECURITY_HEADERS, **response.headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(response.body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            # No tokens in logs: the path never holds one, headers are not logged.
            sys.stderr.write(f"console: {self.address_string()} {format % args}\n")

    return Handler


def run_server(*, host: str, port: int, namespaces: list[str] | None, secure_cookie: bool = False) -> None:
    from ftconsole.kube import ConsoleKube, api_client

    console = Console(kube=ConsoleKube(api_client()), namespaces=namespaces, secure_cookie=secure_cookie)
    server = ThreadingHTTPServer((host, port), handler_class(console))
    server.daemon_threads = True
    print(f"console: listening on {host}:{port}", file=sys.stderr, flush=True)
    server.serve_forever()
