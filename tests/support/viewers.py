"""What a radiologist would see: the node's outputs opened in two real web viewers, in headless Chromium.

* **OHIF Viewer 3** (the prebuilt static app of npm's ``@ohif/app``) reads a study from Orthanc's
  DICOMweb API (``Orthanc(..., dicomweb=True)``): :func:`open_study_in_ohif` opens
  ``/viewer?StudyInstanceUIDs=<uid>`` in OHIF's default mode ("Basic Viewer", longitudinal), checks
  that image series render (not black), opens every SR series in the viewport, counts the
  annotations cornerstone3D draws for it (before and after OHIF's "hydrate" step) and reads their
  labels.
* **dwv** (npm's ``dwv``, an ES module) loads an image and an SR straight from files:
  :func:`open_files_in_dwv` reports how many annotations dwv built from the SR and drew.

Both return a :class:`ViewerResult`: counts, labels, the page's console errors and uncaught
exceptions, requests refused for leaving the machine, screenshots (PNG) of each state, timings.

:class:`ViewerServer` is one small HTTP server on 127.0.0.1 (port 0; ``server.port`` is the one it
got) that serves OHIF's build at ``/`` (with the SPA fallback OHIF's router needs: unknown paths
without a file extension get ``index.html``), a generated ``/app-config.js`` (``window.config``
pointing OHIF's dicomweb data source at this same server), a reverse proxy of ``/dicom-web/`` and
``/wado`` to Orthanc (same origin for the page, so no CORS; the ``Host`` header is rewritten so that
the URLs Orthanc writes into its answers, e.g. BulkDataURI, point back at the proxy), the dwv page
at ``/dwv/`` and any files registered with :meth:`ViewerServer.add_file` at ``/files/<name>``.

:class:`Chromium` drives Debian's ``/usr/bin/chromium`` with Playwright (Playwright cannot fetch its
own browsers here). Every request the page makes to anything but 127.0.0.1/localhost is aborted and
recorded, service workers are blocked, and every wait is on a condition with a deadline.

What OHIF 3.13 does with a TID 1500 SR (measured with this harness; tests/test_viewers_harness.py):
a double-click on the SR thumbnail opens its SR viewport: the referenced image with every region drawn
read-only by the DICOMSRDisplay tool (a ``polyline`` each in the SVG layer, plus a text box
``g[data-annotation-uid]``, one ``tspan`` per line, never the Finding code). The lines depend on where the
region is (extensions/cornerstone-dicom-sr, getSopClassHandlerModule ``_processMeasurement``): for a group with
its SCOORD at its top level (TID 1410) each NUM as "<concept meaning>: <value, 2 decimals> <unit code>" and the
first SCT Finding Site as "363698007: <site meaning>"; for a group whose SCOORD is the source of a NUM (INFERRED
FROM, TID 1501, as OHIF writes its own SRs) each DCM 121106 Comment TEXT as "<text>:", then the NUMs. Then the
prompt "Do you want to continue tracking measurements for this study?"
(``[data-cy="yes-hydrate-btn"]``). Yes "hydrates": a closed 5-point POLYLINE becomes an editable
RectangleROI (``rect``, with computed area/mean/... as its label) and a row titled with the Finding's
code meaning in the Measurements panel (not for a group with a NUM that has no INFERRED FROM region of
its own: the cornerstone adapter logs "No spatial coordinates group found" and hydrates nothing). A
measurement group without image region (TID 1501), anywhere in Imaging Measurements, or an SR without
any measurement group, crashes the viewer route (caught by an error boundary, reported here as a page
error).

The viewers themselves are fetched at set-up time by ``tests/support/fetch_viewers.sh`` into
``.viewers/`` (gitignored; ``DICOM_NODE_VIEWERS_DIR`` overrides); :func:`missing_requirements`
says what is absent so tests can skip with a reason.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import mimetypes
import os
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VIEWERS_DIR = Path(os.environ.get("DICOM_NODE_VIEWERS_DIR", REPO / ".viewers"))
CHROMIUM = Path(os.environ.get("DICOM_NODE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# the folders fetch_viewers.sh fills, and one file each must have
REQUIRED_FILES = {
    "ohif": "dist/index.html",
    "dwv": "dist/dwv.min.js",
    "konva": "lib/index.js",
    "jszip": "dist/jszip.min.js",
    "magic-wand-tool": "dist/magic-wand.js",
}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


def missing_requirements() -> str | None:
    """Why the viewer harness cannot run here (None when it can): the fetched viewers, the system
    Chromium and Playwright's Python package."""
    missing = [
        f".viewers/{name}/{rel}" for name, rel in REQUIRED_FILES.items() if not (VIEWERS_DIR / name / rel).exists()
    ]
    if missing:
        return f"web viewers not fetched ({', '.join(missing)}): run bash tests/support/fetch_viewers.sh"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: apt-get install -y chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is missing: pip install playwright (it drives the system Chromium)"
    return None


def installed_versions() -> dict[str, str]:
    """{folder: version} of the fetched viewer packages (from their package.json)."""
    out = {}
    for name in REQUIRED_FILES:
        pkg = VIEWERS_DIR / name / "package.json"
        if pkg.exists():
            out[name] = json.loads(pkg.read_text())["version"]
    return out


# ---------------------------------------------------------------------------------------------- server


def ohif_app_config(origin: str) -> str:
    """OHIF's ``window.config`` for a DICOMweb server proxied at ``origin`` (this server).

    Nothing in it makes the page fetch anything from elsewhere: no OIDC, no analytics, no
    customization or config URLs; the investigational-use dialog and the cross-origin/CPU-rendering
    notices are off so that nothing covers the viewport in screenshots."""
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "investigationalUseDialog": {"option": "never"},
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "maxNumberOfWebWorkers": 2,
        "maxNumRequests": {"interaction": 20, "thumbnail": 4, "prefetch": 4},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (test)",
                    "name": "orthanc",
                    "qidoRoot": f"{origin}/dicom-web",
                    "wadoRoot": f"{origin}/dicom-web",
                    "wadoUriRoot": f"{origin}/wado",
                    "qidoSupportsIncludeField": False,
                    "supportsReject": False,
                    "supportsStow": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "staticWado": True,
                    "singlepart": "bulkdata,video,pdf",
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return (
        "/* generated by tests/support/viewers.py: OHIF against the test Orthanc behind this server */\n"
        f"window.config = {json.dumps(config, indent=2)};\n"
        "window.config.httpErrorHandler = error => console.warn('OHIF http error', error && error.status);\n"
    )


class ViewerServer:
    """OHIF's build, its app-config, a DICOMweb proxy to Orthanc, the dwv page and test files, all on
    one loopback origin. Use as a context manager, or ``start()`` / ``close()``."""

    def __init__(self, dicomweb_base: str | None = None, *, viewers_dir: Path = VIEWERS_DIR):
        """``dicomweb_base``: Orthanc's HTTP root (``Orthanc.url``, e.g. http://127.0.0.1:8042); its
        ``/dicom-web/`` and ``/wado`` are proxied. None: no proxy (dwv only)."""
        self.viewers_dir = Path(viewers_dir)
        self.ohif_dist = self.viewers_dir / "ohif" / "dist"
        self.upstream = urllib.parse.urlsplit(dicomweb_base) if dicomweb_base else None
        if self.upstream is not None and self.upstream.hostname not in LOOPBACK_HOSTS:
            raise ValueError(f"the proxy only forwards to this machine, not to {dicomweb_base}")
        self.files: dict[str, Path] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for diagnostics
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------- lifecycle
    def start(self) -> ViewerServer:
        handler = type("Handler", (_Handler,), {"owner": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="viewer-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -------------------------------------------------------------------------------- content
    def add_file(self, path: Path | str, name: str | None = None) -> str:
        """Serve a local file at ``/files/<name>``; returns its URL."""
        path = Path(path)
        name = name or path.name
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad file name {name!r}")
        self.files[name] = path
        return f"{self.origin}/files/{urllib.parse.quote(name)}"

    def ohif_viewer_url(self, study_uid: str) -> str:
        return f"{self.origin}/viewer?StudyInstanceUIDs={urllib.parse.quote(study_uid)}"

    def dwv_url(self, *file_urls: str) -> str:
        """The dwv page loading these files in order (image(s) first, then SR(s))."""
        query = urllib.parse.urlencode([("file", u) for u in file_urls])
        return f"{self.origin}/dwv/?{query}"

    def _log(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))


_DWV_SHIMS = {
    # dwv.min.js imports these three by bare name; jszip and magic-wand-tool ship UMD builds, which the
    # page loads as classic scripts first (they set window.JSZip / window.MagicWand); konva ships ESM.
    "jszip.js": "export default window.JSZip;\n",
    "magic-wand-tool.js": "export default window.MagicWand;\n",
}

# /dwv/lib/<name>/... serves viewers_dir/<name>/... for these packages only
_DWV_LIBS = {"dwv", "konva", "jszip", "magic-wand-tool"}


class _Handler(BaseHTTPRequestHandler):
    owner: ViewerServer  # set on the subclass made by ViewerServer.start
    protocol_version = "HTTP/1.1"  # keep-alive: OHIF makes hundreds of requests
    server_version = "dicom-node-viewer-harness"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in owner.requests instead of stderr

    def send_response(self, code: int, message: str | None = None) -> None:
        self.owner._log(self.command, self.path, code)
        super().send_response(code, message)

    # every method goes through one router
    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        try:
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith("/dicom-web/") or path == "/dicom-web" or path.startswith("/wado"):
                return self._proxy()
            if self.command == "POST":
                return self._send(405, b"read-only", "text/plain")
            if path == "/app-config.js":
                return self._send(200, ohif_app_config(self.owner.origin).encode(), "application/javascript")
            if path.startswith("/files/"):
                name = urllib.parse.unquote(path[len("/files/") :])
                file = self.owner.files.get(name)
                return self._send_file(file) if file else self._send(404, b"no such file", "text/plain")
            if path == "/dwv" or path == "/dwv/":
                return self._send(200, DWV_PAGE.encode(), "text/html; charset=utf-8")
            if path.startswith("/dwv/shim/"):
                shim = _DWV_SHIMS.get(path[len("/dwv/shim/") :])
                return self._send(200, shim.encode(), "application/javascript") if shim else self._send(404, b"")
            if path.startswith("/dwv/lib/"):
                lib, _, rest = path[len("/dwv/lib/") :].partition("/")
                if lib in _DWV_LIBS:
                    return self._send_static(self.owner.viewers_dir / lib, rest)
                return self._send(404, b"")
            if path == "/favicon.ico" and not (self.owner.ohif_dist / "favicon.ico").exists():
                return self._send(204, b"")
            return self._send_ohif(path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away mid-answer (navigation, closed context)

    # -------------------------------------------------------------------------------- static
    def _send_ohif(self, path: str) -> None:
        """OHIF's static build; its router owns every path without a file extension (SPA fallback)."""
        rel = path.lstrip("/") or "index.html"
        target = _inside(self.owner.ohif_dist, rel)
        if target is not None and target.is_file():
            return self._send_file(target)
        last = rel.rsplit("/", 1)[-1]
        if "." not in last:  # /viewer, /viewer/orthanc, / ... : a route, not a file
            return self._send_file(self.owner.ohif_dist / "index.html")
        return self._send(404, b"not found", "text/plain")

    def _send_static(self, root: Path, rel: str) -> None:
        target = _inside(root, rel)
        if target is None or not target.is_file():
            return self._send(404, b"not found", "text/plain")
        self._send_file(target)

    def _send_file(self, file: Path) -> None:
        ctype = _content_type(file)
        size = file.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", "no-cache" if file.suffix in (".html", ".dcm", "") else "max-age=3600")
        self.end_headers()
        if self.command != "HEAD":
            with file.open("rb") as fh:
                shutil.copyfileobj(fh, self.wfile, 1 << 20)

    def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -------------------------------------------------------------------------------- proxy
    def _proxy(self) -> None:
        up = self.owner.upstream
        if up is None:
            return self._send(502, b"no DICOMweb server behind this harness", "text/plain")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() in ("accept", "content-type", "range", "if-none-match", "if-modified-since")
        }
        # Orthanc's DICOMweb plugin builds the absolute URLs it returns (RetrieveURL, BulkDataURI) from
        # the Host header: make them point back at this proxy, i.e. at the page's own origin.
        headers["Host"] = f"127.0.0.1:{self.owner.port}"
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port or 80, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()  # small test studies: buffer, then answer with a Content-Length
        except OSError as exc:
            return self._send(502, f"Orthanc did not answer: {exc}".encode(), "text/plain")
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("content-type", "etag", "last-modified", "content-range"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _inside(root: Path, rel: str) -> Path | None:
    """root/rel if it stays inside root (no ../ escapes)."""
    root = root.resolve()
    target = (root / urllib.parse.unquote(rel)).resolve()
    return target if target == root or root in target.parents else None


def _content_type(file: Path) -> str:
    special = {
        ".js": "application/javascript",
        ".mjs": "application/javascript",
        ".wasm": "application/wasm",  # needed for WebAssembly.instantiateStreaming
        ".json": "application/json",
        ".map": "application/json",
        ".dcm": "application/dicom",
        ".html": "text/html; charset=utf-8",
        ".css": "text/css",
        ".svg": "image/svg+xml",
        ".woff2": "font/woff2",
    }
    return special.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"


# ---------------------------------------------------------------------------------------------- browser


@dataclass
class PageLog:
    """What a page said: console messages, uncaught exceptions, requests refused or failed."""

    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text)
    page_errors: list[str] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)  # aborted: not on this machine
    failed_requests: list[str] = field(default_factory=list)

    @property
    def console_errors(self) -> list[str]:
        return [text for kind, text in self.console if kind == "error"]

    @property
    def caught_errors(self) -> list[str]:
        """Exceptions the app caught itself and only logged: OHIF's React error boundaries report the
        crash of a viewer route at console.debug level ("Route viewer Error Boundary TypeError: ...")."""
        return [text for _kind, text in self.console if "Error Boundary" in text]

    @property
    def errors(self) -> list[str]:
        """Uncaught exceptions plus errors caught by an error boundary: what breaks the page."""
        return self.page_errors + self.caught_errors


class Chromium:
    """Debian's Chromium driven by Playwright, headless. One browser for many pages; each page gets its
    own context (fresh storage), sees only this machine, and runs no service worker."""

    def __init__(self, executable: Path = CHROMIUM, args: list[str] | None = None):
        self.executable = executable
        self.args = list(CHROMIUM_ARGS if args is None else args)
        self._pw: Any = None
        self._browser: Any = None
        self._contexts: list[Any] = []

    def start(self) -> Chromium:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=str(self.executable), args=self.args)
        except BaseException:
            self._pw.stop()
            self._pw = None
            raise
        return self

    def close(self) -> None:
        for ctx in self._contexts:
            with contextlib.suppress(Exception):  # a context whose page crashed may already be gone
                ctx.close()
        self._contexts.clear()
        if self._browser is not None:
            with contextlib.suppress(Exception):
                self._browser.close()
            self._browser = None
        if self._pw is not None:
            self._pw.stop()
            self._pw = None

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def version(self) -> str:
        return self._browser.version if self._browser is not None else ""

    def new_page(self, *, width: int = 1400, height: int = 900, init_script: str | None = None) -> tuple[Any, PageLog]:
        """A page in a new context, with its PageLog collecting from the start."""
        assert self._browser is not None, "Chromium not started"
        ctx = self._browser.new_context(viewport={"width": width, "height": height}, service_workers="block")
        self._contexts.append(ctx)
        log = PageLog()

        def only_loopback(route: Any) -> None:
            url = route.request.url
            host = urllib.parse.urlsplit(url).hostname
            if url.startswith(("data:", "blob:")) or host in LOOPBACK_HOSTS:
                route.continue_()
            else:
                log.blocked_requests.append(url)
                route.abort("blockedbyclient")

        ctx.route("**/*", only_loopback)
        if init_script:
            ctx.add_init_script(init_script)
        page = ctx.new_page()
        page.on("console", lambda msg: log.console.append((msg.type, msg.text)))
        page.on("pageerror", lambda exc: log.page_errors.append(f"{exc.name}: {exc.message}"))
        page.on(
            "requestfailed",
            lambda req: log.failed_requests.append(f"{req.method} {req.url}: {req.failure}"),
        )
        return page, log


def _poll(what: str, probe: Any, done: Any, timeout: float, interval: float = 0.25) -> Any:
    """Call probe() until done(value) is true; the last value, or TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}; last: {value!r}"[:2000])
        time.sleep(interval)


def _settle(probe: Any, ready: Any, timeout: float, quiet: float = 1.0, interval: float = 0.25) -> tuple[Any, bool]:
    """Poll probe() until ready(value) holds and the value stayed the same for `quiet` seconds.
    Returns (last value, settled); never raises: a page that keeps changing is a finding too."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        value = probe()
        now = time.monotonic()
        if value != last:
            last, since = value, now
        elif ready(value) and now - since >= quiet:
            return value, True
        if now > deadline:
            return value, False
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class SeriesView:
    """One series as OHIF showed it in the viewport after a double-click on its thumbnail."""

    series_uid: str
    modality: str
    description: str
    series_number: str
    rendered: bool | None = None  # images: the viewport shows a picture (not black)
    bright_fraction: float | None = None  # share of viewport pixels brighter than 40/255
    annotations: int = 0  # annotations drawn in the viewport's SVG layer (distinct data-annotation-uid)
    shapes: dict[str, int] = field(default_factory=dict)  # SVG shapes drawn: polyline (SR display), rect, ...
    labels: list[str] = field(default_factory=list)  # text of each annotation's text box (lines joined by " | ")
    tools: list[str] = field(default_factory=list)  # cornerstone3D annotations (tool names) on the viewport
    sr_read: int | None = None  # SR: measurements OHIF read from it (one per tracking UID)
    sr_placed: int | None = None  # SR: of those, how many OHIF found an image for
    redraw_needed: bool = False  # SR: its annotations were drawn only after the harness re-rendered the viewport
    hydrate_offered: bool = False  # OHIF asked "Do you want to continue tracking measurements for this study?"
    hydrated: bool = False  # the harness answered Yes and OHIF turned the SR into tracked measurements
    hydrated_annotations: int = 0
    hydrated_shapes: dict[str, int] = field(default_factory=dict)
    hydrated_labels: list[str] = field(default_factory=list)
    hydrated_tools: list[str] = field(default_factory=list)
    measurement_rows: list[str] = field(default_factory=list)  # titles in the Measurements panel
    errors: list[str] = field(default_factory=list)  # page errors that appeared while this series was opened
    warnings: list[str] = field(default_factory=list)  # console warnings meanwhile (e.g. why hydration failed)
    settled: bool = True  # False: the viewport was still changing when the harness stopped waiting
    screenshots: list[Path] = field(default_factory=list)


@dataclass
class ViewerResult:
    """What one viewer showed. ``annotations``/``labels``: for OHIF, over the SR series opened (before
    hydration); for dwv, the shapes drawn from the SR files."""

    viewer: str
    url: str
    annotations: int = 0
    labels: list[str] = field(default_factory=list)
    series: list[SeriesView] = field(default_factory=list)  # OHIF: every series opened, in order
    page_errors: list[str] = field(default_factory=list)  # uncaught + caught by an error boundary
    console_errors: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    screenshots: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def views(self, modality: str) -> list[SeriesView]:
        return [v for v in self.series if v.modality == modality]

    def summary(self) -> str:
        """A few lines for assertion messages and logs."""
        lines = [f"{self.viewer} {self.url}: {self.annotations} annotations, labels {self.labels}"]
        for v in self.series:
            lines.append(
                f"  {v.modality} #{v.series_number} {v.description!r}: rendered={v.rendered} "
                f"read/placed={v.sr_read}/{v.sr_placed} annotations={v.annotations} shapes={v.shapes} "
                f"labels={v.labels} redraw_needed={v.redraw_needed} hydrate_offered={v.hydrate_offered} "
                f"hydrated={v.hydrated} ({v.hydrated_annotations} {v.hydrated_shapes} {v.hydrated_labels}) "
                f"rows={v.measurement_rows} errors={v.errors}"
            )
        lines.append(f"  page errors: {self.page_errors}")
        lines.append(f"  console errors: {self.console_errors}")
        lines.append(f"  blocked: {self.blocked_requests}  timings: {self.timings}")
        return "\n".join(lines)

    def _take_log(self, log: PageLog) -> None:
        self.page_errors = list(log.errors)
        self.console_errors = list(log.console_errors)
        self.console = list(log.console)
        self.blocked_requests = list(log.blocked_requests)
        self.failed_requests = list(log.failed_requests)


# ---------------------------------------------------------------------------------------------- OHIF

# Onboarding tours are remembered in localStorage ("shownTours"); mark OHIF's one tour as shown so that
# its pop-over does not cover the viewport.
OHIF_INIT_SCRIPT = "try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) {}"

# Stable selectors of OHIF 3.13 (data-cy attributes are what OHIF's own Playwright tests use).
SEL_THUMBNAIL = '[data-cy="study-browser-thumbnail"], [data-cy="study-browser-thumbnail-no-image"]'
SEL_HYDRATE_YES = '[data-cy="yes-hydrate-btn"]'
SEL_MEASUREMENTS_BUTTON = '[data-cy="trackedMeasurements-btn"]'
SEL_MEASUREMENT_TITLES = '[data-cy="trackedMeasurements-panel"] [data-cy="data-row-title"]'

# Everything about the active viewport in one round trip. cornerstone3D draws annotations into
# `svg.svg-layer` inside the viewport element; only text boxes carry the annotation UID
# (`g[data-annotation-uid]`), the shapes are plain children of the layer (`polyline` for OHIF's
# read-only SR display tool, `rect` for a hydrated RectangleROI, ...).
_OHIF_PROBE = """(srUid) => {
  const services = window.services, cs = window.cornerstone, tools = window.cornerstoneTools;
  if (!services || !cs) return {ready: false};
  // the SR display set being opened: how many measurements OHIF read from it, how many it placed on an image
  const sr = srUid ? services.displaySetService.getDisplaySetByUID(srUid) : null;
  const srMeasurements = sr && sr.isLoaded && Array.isArray(sr.measurements) ? sr.measurements : null;
  const grid = services.viewportGridService.getState();
  const viewportId = grid.activeViewportId;
  const vp = grid.viewports.get(viewportId);
  const element = document.querySelector(`.cornerstone-viewport-element[data-viewportid="${viewportId}"]`);
  const out = {ready: !!element, viewportId, displaySets: vp ? vp.displaySetInstanceUIDs || [] : [],
               annotations: 0, shapes: {}, labels: [], tools: [], bright: null, imageId: null,
               hydratePrompt: !!document.querySelector('[data-cy="yes-hydrate-btn"]'),
               measurements: services.measurementService.getMeasurements().length,
               srRead: srMeasurements ? srMeasurements.length : null,
               srPlaced: srMeasurements ? srMeasurements.filter(m => m.loaded).length : null};
  if (!element) return out;
  const svg = element.querySelector('svg.svg-layer');
  if (svg) {
    const uids = new Set();
    for (const g of svg.querySelectorAll('g[data-annotation-uid]')) {
      const uid = g.getAttribute('data-annotation-uid');
      if (uids.has(uid)) continue;
      uids.add(uid);
      const lines = [...g.querySelectorAll('tspan')].map(t => t.textContent.trim()).filter(Boolean);
      out.labels.push(lines.length ? lines.join(' | ') : g.textContent.trim());
    }
    out.annotations = uids.size;
    for (const child of svg.children) {
      const tag = child.tagName.toLowerCase();
      if (['defs', 'g'].includes(tag)) continue;
      out.shapes[tag] = (out.shapes[tag] || 0) + 1;
    }
  }
  try {
    const engine = cs.getRenderingEngine('OHIFCornerstoneRenderingEngine');
    const viewport = engine && engine.getViewport(viewportId);
    out.imageId = viewport && viewport.getCurrentImageId ? viewport.getCurrentImageId() || null : null;
  } catch (e) { out.imageId = null; }
  if (tools && tools.annotation) {
    out.tools = tools.annotation.state.getAllAnnotations()
      .filter(a => a.metadata && a.metadata.toolName !== 'ReferenceLines')
      .map(a => a.metadata.toolName).sort();
  }
  const canvas = element.querySelector('canvas.cornerstone-canvas');
  const ctx = canvas && canvas.width && canvas.getContext('2d', {willReadFrequently: true});
  if (ctx) {
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let bright = 0, n = 0;
    for (let i = 0; i < data.length; i += 4 * 7) {  // every 7th pixel is plenty
      n += 1;
      if (0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2] > 40) bright += 1;
    }
    out.bright = n ? bright / n : 0;
  }
  return out;
}"""

_OHIF_RERENDER = """() => {
  const engine = window.cornerstone.getRenderingEngine('OHIFCornerstoneRenderingEngine');
  if (engine) engine.render();
}"""

_OHIF_DISPLAY_SETS = """() => window.services.displaySetService.getActiveDisplaySets().map(ds => ({
  uid: ds.displaySetInstanceUID, modality: ds.Modality || '', series: ds.SeriesInstanceUID || '',
  number: String(ds.SeriesNumber ?? ''), description: ds.SeriesDescription || '',
  loaded: ds.isLoaded !== false}))"""

RENDERED_MIN_BRIGHT = 0.05  # a viewport showing a radiograph has far more than 5 % non-dark pixels


def open_study_in_ohif(
    chromium: Chromium,
    server: ViewerServer,
    study_uid: str,
    out_dir: Path,
    *,
    open_sr: bool = True,
    hydrate: bool = True,
    timeout: float = 60,
    step_timeout: float = 20,
) -> ViewerResult:
    """Open the study in OHIF's Basic Viewer, show every series, and report what was drawn.

    Steps: load ``/viewer?StudyInstanceUIDs=<uid>`` and wait for the first image; double-click every
    image series' thumbnail (DX, SC, ...) and check the viewport is not black; then double-click every
    SR thumbnail (OHIF loads the SR into its SR viewport: the referenced image with the SR's regions
    drawn read-only, and asks "Do you want to continue tracking measurements for this study?"), count
    the annotations drawn, and (``hydrate``) answer Yes: OHIF then converts them into editable tracked
    measurements, which are counted again, with the titles of the Measurements panel. A screenshot of
    each state goes to ``out_dir``. Every wait is bounded: ``timeout`` for the app, ``step_timeout``
    per series."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    url = server.ohif_viewer_url(study_uid)
    result = ViewerResult("ohif", url, details={"versions": installed_versions(), "chromium": chromium.version})
    page, log = chromium.new_page(init_script=OHIF_INIT_SCRIPT)
    t0 = time.monotonic()
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
        page.locator(SEL_THUMBNAIL).first.wait_for(state="visible", timeout=timeout * 1000)
        result.timings["study_browser_s"] = round(time.monotonic() - t0, 2)
        first, _ = _settle(
            lambda: page.evaluate(_OHIF_PROBE),
            lambda v: bool(v.get("ready")) and (v.get("bright") or 0) >= RENDERED_MIN_BRIGHT,
            timeout,
        )
        result.timings["first_image_s"] = round(time.monotonic() - t0, 2)
        result.details["first_viewport"] = {k: first.get(k) for k in ("displaySets", "imageId", "bright")}
        result.screenshots["initial"] = _screenshot(page, out_dir / "ohif-0-initial.png")

        display_sets = page.evaluate(_OHIF_DISPLAY_SETS)
        result.details["display_sets"] = display_sets
        display_sets.sort(key=lambda d: (int(d["number"]) if d["number"].isdigit() else 1 << 30, d["series"]))
        images = [d for d in display_sets if d["modality"] != "SR"]
        reports = [d for d in display_sets if d["modality"] == "SR"]
        for n, ds in enumerate(images + (reports if open_sr else []), start=1):
            t1 = time.monotonic()
            view = _ohif_open_series(page, log, ds, out_dir, n, hydrate=hydrate, timeout=step_timeout)
            result.timings[f"series_{n}_{ds['modality']}_s"] = round(time.monotonic() - t1, 2)
            result.series.append(view)
            for i, shot in enumerate(view.screenshots):
                result.screenshots[f"{n}-{ds['modality']}-{i}"] = shot
        srs = result.views("SR")
        result.annotations = sum(v.annotations for v in srs)
        result.labels = [label for v in srs for label in v.labels]
    finally:
        result.timings["total_s"] = round(time.monotonic() - t0, 2)
        result._take_log(log)
        page.context.close()
    return result


def _ohif_open_series(
    page: Any, log: PageLog, ds: dict, out_dir: Path, n: int, *, hydrate: bool, timeout: float
) -> SeriesView:
    view = SeriesView(ds["series"], ds["modality"], ds["description"], ds["number"])
    errors_before, console_before = len(log.errors), len(log.console)
    thumb = page.locator(f'[id="thumbnail-{ds["uid"]}"]')
    thumb.wait_for(state="visible", timeout=timeout * 1000)
    thumb.dblclick()
    probe = lambda: page.evaluate(_OHIF_PROBE, ds["uid"] if ds["modality"] == "SR" else None)
    tag = f"ohif-{n}-{ds['modality'].lower()}-{ds['number'] or 'x'}"

    if ds["modality"] != "SR":
        # an image series: wait until the viewport holds it and shows a picture
        value, view.settled = _settle(
            probe,
            lambda v: ds["uid"] in v.get("displaySets", []) and (v.get("bright") or 0) >= RENDERED_MIN_BRIGHT,
            timeout,
        )
        view.bright_fraction = value.get("bright")
        view.rendered = ds["uid"] in value.get("displaySets", []) and (view.bright_fraction or 0) >= RENDERED_MIN_BRIGHT
        view.screenshots.append(_screenshot(page, out_dir / f"{tag}.png"))
        view.errors = log.errors[errors_before:]
        view.warnings = [text for kind, text in log.console[console_before:] if kind == "warning"]
        return view

    # an SR: OHIF reads its measurements, places each on the image it references (measurement.loaded) and
    # draws them once that image is rendered. Settled when every placed measurement is drawn, or the page
    # broke; an SR with nothing OHIF could place leaves the viewport empty: settled after 3 quiet seconds.
    opened = time.monotonic()

    def sr_ready(v: dict) -> bool:
        if len(log.errors) > errors_before:  # e.g. OHIF's viewer route crashed: its viewport is gone
            return True
        if not v.get("ready") or v.get("srPlaced") is None:
            return False
        waited = time.monotonic() - opened
        if v["srPlaced"] > 0:  # all drawn, and OHIF's hydrate prompt shown (it comes with them; 5 s grace)
            return v.get("annotations", 0) >= v["srPlaced"] and (bool(v.get("hydratePrompt")) or waited > 5)
        return waited > 3

    value, view.settled = _settle(probe, sr_ready, min(timeout, 4))
    placed, drawn = value.get("srPlaced") or 0, value.get("annotations", 0)
    if drawn < placed and len(log.errors) == errors_before and value.get("tools", []).count("DICOMSRDisplay") >= placed:
        # OHIF 3.13 race, about 1 run in 10 here: the SR's annotations are in cornerstone's state but nothing
        # re-renders the viewport after they were added (a DX has no Frame of Reference to trigger it by), so
        # they appear only when the user next touches the image. Re-render once, as that touch would, and say so.
        view.redraw_needed = True
        page.evaluate(_OHIF_RERENDER)
        value, view.settled = _settle(probe, sr_ready, timeout)
    view.annotations, view.shapes = value.get("annotations", 0), value.get("shapes", {})
    view.labels, view.tools = value.get("labels", []), value.get("tools", [])
    view.bright_fraction = value.get("bright")
    view.rendered = (view.bright_fraction or 0) >= RENDERED_MIN_BRIGHT
    view.hydrate_offered = bool(value.get("hydratePrompt"))
    view.sr_read, view.sr_placed = value.get("srRead"), value.get("srPlaced")
    view.screenshots.append(_screenshot(page, out_dir / f"{tag}.png"))

    if hydrate and view.hydrate_offered:
        page.locator(SEL_HYDRATE_YES).click()
        clicked = time.monotonic()

        def hydrated_or_given_up(v: dict) -> bool:
            # done: tracked measurements exist, or the page broke, or nothing happened for a while (OHIF
            # only logs a warning when it cannot convert an SR region into a measurement)
            if v.get("hydratePrompt"):
                return False
            if len(log.errors) > errors_before:
                return True
            if v.get("measurements", 0) > 0:  # tracked measurements exist: wait until each is drawn
                return v.get("annotations", 0) >= v["measurements"]
            return time.monotonic() - clicked > 3

        value, settled = _settle(probe, hydrated_or_given_up, timeout)
        view.settled = view.settled and settled
        view.hydrated = value.get("measurements", 0) > 0
        view.hydrated_annotations, view.hydrated_shapes = value.get("annotations", 0), value.get("shapes", {})
        view.hydrated_labels, view.hydrated_tools = value.get("labels", []), value.get("tools", [])
        view.measurement_rows = _ohif_measurement_rows(page, expected=value.get("measurements", 0), timeout=timeout)
        view.screenshots.append(_screenshot(page, out_dir / f"{tag}-hydrated.png"))
    view.errors = log.errors[errors_before:]
    view.warnings = [text for kind, text in log.console[console_before:] if kind == "warning"]
    return view


def _ohif_measurement_rows(page: Any, *, expected: int, timeout: float) -> list[str]:
    """Titles of the rows of the Measurements panel (opened if it is closed)."""
    rows = page.locator(SEL_MEASUREMENT_TITLES)
    if rows.count() == 0 and page.locator(SEL_MEASUREMENTS_BUTTON).count():
        page.locator(SEL_MEASUREMENTS_BUTTON).first.click()
    with contextlib.suppress(TimeoutError):
        _poll("the Measurements panel rows", rows.count, lambda c: c >= expected, timeout)
    return [t.strip() for t in rows.all_inner_texts()]


def _screenshot(page: Any, path: Path) -> Path:
    page.screenshot(path=str(path))
    return path


# ---------------------------------------------------------------------------------------------- dwv


def open_files_in_dwv(
    chromium: Chromium,
    server: ViewerServer,
    files: list[Path | str],
    out_dir: Path,
    *,
    timeout: float = 30,
) -> ViewerResult:
    """Load ``files`` (the image first, then the SR) into dwv and report the annotations it built and drew.

    ``details["data"]`` has one entry per file: modality, ``annotations`` (what dwv built from the SR,
    None when it ignored it), ``drawn``, ``shapes``, ``labels``, ``items`` (tracking ids and the coded
    content dwv kept) and ``warn`` (dwv's own warnings, e.g. "Not a dwv supported annotation")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    urls = [server.add_file(f) for f in files]
    url = server.dwv_url(*urls)
    result = ViewerResult("dwv", url, details={"versions": installed_versions(), "chromium": chromium.version})
    page, log = chromium.new_page(width=900, height=850)
    t0 = time.monotonic()
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
        page.wait_for_function(
            "window.dwvResult && window.dwvResult.status !== 'loading'", timeout=timeout * 1000, polling=100
        )
        result.timings["loaded_s"] = round(time.monotonic() - t0, 2)
        state = page.evaluate("window.dwvResult")
        result.details.update(state)
        reports = [d for d in state["data"] if d.get("modality") == "SR"]
        result.annotations = sum(d.get("drawn") or 0 for d in reports)
        result.labels = [label for d in reports for label in d.get("labels", [])]
        result.screenshots["dwv"] = _screenshot(page, out_dir / "dwv.png")
    finally:
        result.timings["total_s"] = round(time.monotonic() - t0, 2)
        result._take_log(log)
        result.page_errors += [e for e in result.details.get("errors", [])]
        page.context.close()
    return result


# The dwv page: loads ?file=<url> in order (images first, then SR), then publishes window.dwvResult.
# dwv ships an ES module that imports konva (ESM), jszip and magic-wand-tool (UMD) by bare name: the
# two UMD builds are loaded as classic scripts and re-exported by two one-line shims; an import map
# points the bare names at them. Every URL is on this server.
DWV_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dwv (test harness)</title>
<style>
  body { margin: 0; background: #000; color: #ccc; font: 13px sans-serif; }
  #layerGroup0 { width: 800px; height: 800px; position: relative; }
  #status { position: absolute; top: 4px; right: 8px; }
</style>
<script src="/dwv/lib/jszip/dist/jszip.min.js"></script>
<script src="/dwv/lib/magic-wand-tool/dist/magic-wand.js"></script>
<script type="importmap">
{"imports": {
  "konva": "/dwv/lib/konva/lib/index.js",
  "jszip": "/dwv/shim/jszip.js",
  "magic-wand-tool": "/dwv/shim/magic-wand-tool.js"
}}
</script>
</head>
<body>
<div id="layerGroup0"></div>
<div id="status">loading</div>
<script type="module">
import {App, AppOptions, ViewConfig} from '/dwv/lib/dwv/dist/dwv.min.js';

const result = {status: 'loading', errors: [], warnings: [], data: []};
window.dwvResult = result;
window.addEventListener('error', e => result.errors.push('window error: ' + e.message));
window.addEventListener('unhandledrejection', e => result.errors.push('unhandled rejection: ' + e.reason));

const app = new App();
const options = new AppOptions({'*': [new ViewConfig('layerGroup0')]});
app.init(options);
window.dwvApp = app;
app.addEventListener('warn', e => result.warnings.push(String(e.warn || e.message || e)));
app.addEventListener('error', e => result.errors.push('dwv error: ' + String(e.error && e.error.message || e.error)));

// one file at a time: the SR's draw layer needs its referenced image to be there already
function load(url) {
  return new Promise(resolve => {
    const onEnd = event => {
      app.removeEventListener('loadend', onEnd);
      resolve(event.dataid);
    };
    app.addEventListener('loadend', onEnd);
    app.loadURLs([url]);
  });
}

function describe(dataId) {
  const data = app.getData(dataId);
  const modality = data && data.meta && data.meta['00080060'] ? data.meta['00080060'].value[0] : null;
  const out = {dataId, modality, image: !!(data && data.image), annotations: null, drawn: null,
               shapes: [], labels: [], items: [], warn: data && data.warn ? data.warn.map(String) : []};
  if (!data || !data.annotationGroup) {
    return out;
  }
  // what dwv built from the SR: one Annotation per measurement group it understood
  const group = data.annotationGroup;
  out.annotations = group.getLength();
  for (const a of group.getList()) {
    if (!a) {
      out.items.push(null);  // a group dwv could not turn into a shape
      continue;
    }
    const meta = {};
    for (const id of a.getMetaConceptIds()) {
      const item = a.getMetaItem(id);
      meta[item.concept.meaning] = typeof item.value === 'string' ? item.value : item.value.meaning;
    }
    out.items.push({trackingId: a.trackingId, trackingUid: a.trackingUid, text: a.textExpr || '', meta});
  }
  // what dwv drew: one Konva group named '<shape>-group' (id = tracking UID) per annotation shown
  out.drawn = 0;
  for (const layer of app.getDrawLayersByDataId(dataId)) {
    const shapes = layer.getKonvaLayer().find(n => n.getClassName() === 'Group' && /-group$/.test(n.name())
                                                   && n.name() !== 'position-group');
    for (const shape of shapes) {
      if (!shape.isVisible()) {
        continue;
      }
      out.drawn += 1;
      out.shapes.push(shape.name().replace(/-group$/, ''));
      const label = shape.findOne('Label');
      out.labels.push(label && label.isVisible() ? label.getText().text() : '');
    }
  }
  return out;
}

(async () => {
  try {
    const urls = new URLSearchParams(location.search).getAll('file');
    for (const url of urls) {
      const dataId = await load(url);
      result.data.push(dataId);
    }
    // drawing happens on render: wait two frames so Konva has drawn
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    result.data = result.data.map(describe);
    result.status = 'done';
  } catch (err) {
    result.errors.push('harness: ' + (err && err.stack || err));
    result.status = 'failed';
  }
  document.getElementById('status').textContent = result.status;
})();
</script>
</body>
</html>
"""
