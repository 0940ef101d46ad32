"""The HTTP server of ``serve`` (Starlette on uvicorn, in a thread of the node process): ``/healthz`` (the process
is up), ``/readyz`` (it can do its job: database reachable, spool writable, free disk above
``storage.min_free_disk_mb``, at least one live worker with its models loaded) and ``/metrics`` (Prometheus text
format), none of which carries patient data or needs a login; and the web console behind a login
(:mod:`dicom_node.web.console`)."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dicom_node.config import Config
from dicom_node.web.auth import session_secret
from dicom_node.web.console import Console
from dicom_node.web.drift import DriftWatch
from dicom_node.web.metrics import registry_for
from storage import Store

if TYPE_CHECKING:
    from dicom_node.ingest.store_handler import StoreHandler
    from inference.pipeline import Pipeline

log = logging.getLogger(__name__)


def readiness(config: Config, store: Store) -> dict[str, str]:
    """Each check -> "ok" or what is wrong. Cheap (load balancers ask every few seconds): one count query.

    Workers count only for an instance that runs its own (``workers.count`` > 0): a pure listener can receive and
    keep studies while no worker is up anywhere (they wait in the queue), so a load balancer keeps sending to it."""
    checks: dict[str, str] = {}
    try:
        alive = store.live_workers()
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the type says which
        return {"database": f"unreachable ({type(exc).__name__})"}
    try:
        fd, name = tempfile.mkstemp(dir=store.spool.tmp, suffix=".ready")
        os.close(fd)
        os.unlink(name)
        checks["spool"] = "ok"
    except OSError as exc:
        checks["spool"] = f"not writable ({exc.strerror})"
    free = store.spool.free_mb()
    floor = config.storage.min_free_disk_mb
    checks["disk"] = "ok" if free >= floor else f"{free:.0f} MB free, below storage.min_free_disk_mb ({floor})"
    if config.workers.count > 0:
        checks["workers"] = "ok" if alive else "no live worker with loaded models"
    return checks


def make_app(
    config: Config,
    store: Store,
    load_pipeline: Callable[[], Pipeline],
    active: Callable[[], int] | None = None,
    ingest: StoreHandler | None = None,
    membership: Callable[[], dict[str, str]] | None = None,
) -> Starlette:
    """The web side: health, readiness, metrics and the console. ``load_pipeline`` builds the models for the
    console's analyse page on first use; ``active`` counts the open DICOM associations (for /metrics); ``ingest``
    (the C-STORE handler) stores what STOW-RS receives when ``dicomweb.enabled``."""
    registry = registry_for(store, active, DriftWatch(config, store))

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> Response:
        checks = readiness(config, store)
        ready = all(v == "ok" for v in checks.values())
        body: dict[str, Any] = {"ready": ready, "checks": checks}
        if membership is not None:  # which serve instance answers, and whether it leads (storage.cluster)
            body.update(membership())
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    console = Console(config, store, load_pipeline)
    stow: list[Route] = []
    if config.dicomweb.enabled and ingest is not None:
        from dicom_node.web.stow import Stow

        stow = Stow(config, ingest).routes()
    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            *stow,
            *console.routes(),
        ],
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware,
                secret_key=session_secret(config.storage.root),
                session_cookie="dicom_node_session",
                max_age=int(config.web.session_hours * 3600),
                same_site="strict",
                https_only=config.web.secure_cookies,
            ),
        ],
    )


class SecurityHeaders:
    """No framing, no foreign content, no caching of pages that show patient data (pure ASGI middleware)."""

    HEADERS = [
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
        ),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                own = [h for h in headers if h[0] == b"content-security-policy"]  # a page's stricter own policy
                headers.extend(h for h in self.HEADERS if not (own and h[0] == b"content-security-policy"))
                if not static and not any(k == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class WebServer:
    """uvicorn in a daemon thread; ``start`` returns the bound port (``web.port: 0``: the one the OS chose)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        load_pipeline: Callable[[], Pipeline],
        active: Callable[[], int] | None = None,
        ingest: StoreHandler | None = None,
        membership: Callable[[], dict[str, str]] | None = None,
    ):
        self.config = config
        app = make_app(config, store, load_pipeline, active, ingest, membership)
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host=config.web.host, port=config.web.port, log_level="warning", access_log=False, lifespan="off"
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)

    def start(self, timeout: float = 10.0) -> int:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web server did not start on {self.config.web.host}:{self.config.web.port}")
            time.sleep(0.02)
        port = int(self.server.servers[0].sockets[0].getsockname()[1])
        log.info("web console, healthz, readyz, metrics on http://%s:%d", self.config.web.host, port)
        return port

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
