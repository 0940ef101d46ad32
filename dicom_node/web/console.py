"""The web console: server-rendered pages (Starlette + Jinja2 templates, no JavaScript) behind a login.

    /login, /logout            the login form; POST /logout ends the session
    /                          overview: counts by state, the last hour's throughput, workers, disk, destinations
    /studies                   paged, filterable list (state, day received, skip reason)
    /studies/{uid}             images (selection and reason), jobs, findings, overlays, deliveries;
                               POST .../reanalyse queues a re-analysis
    /deliveries/{id}/retry     POST: re-queue one failed delivery
    /results/{id}.png          a Secondary Capture overlay as PNG
    /analyse                   upload DICOM/PNG/JPEG files, see what ``dicom-node analyze`` says (nothing kept)
    /models                    the configured model files: versions, sha256, metrics, the model card, the latest
                               site validation of the pair
    /studies/{uid}/verdict     POST: an operator's verdict on the study's result (agree / disagree / finding
                               missed), kept as site ground truth
    /validation                the site validations (``dicom-node validate``); POST /validation/run makes one
    /validation/{id}/report    a validation's HTML report

Every page needs a login (``web.users``); every POST carries the session's CSRF token. Patient name and ID are
shown on a study's page (read from its first image), never written to a log; actions go to the audit trail.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from dicom_node import __version__, audit
from dicom_node.config import Config
from dicom_node.membership import STALE_S
from dicom_node.passwords import hash_password, verify_password
from dicom_node.web.auth import LoginThrottle, csrf_ok
from dicom_node.web.drift import DriftWatch, weekly_chart
from dicom_node.work.site_validation import PairFacts
from inference.types import FINDING_CLASSES
from storage import Store
from storage.errors import UnknownStudyError
from storage.queries import STUDY_STATES, Queries

if TYPE_CHECKING:
    from inference.pipeline import Pipeline

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
Handler = Callable[..., Awaitable[Response]]


def _ago(t: datetime | None) -> str:
    if t is None:
        return "never"
    s = (datetime.now(UTC) - (t if t.tzinfo else t.replace(tzinfo=UTC))).total_seconds()
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} days ago"


def _when(t: datetime | None) -> str:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "-"


def _mb(n: float | int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


class LazyPipeline:
    """The models for the analyse page, loaded in the node process on first use (torch is imported then)."""

    def __init__(self, load: Callable[[], Pipeline]):
        self.load = load
        self._pipeline: Pipeline | None = None
        self.lock = threading.Lock()  # one upload analysed at a time: the workers keep their cores

    def get(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = self.load()
        return self._pipeline


class ModelFacts:
    """Model files' metadata and sha256, read once per file version (path, size, mtime)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], dict[str, Any]] = {}

    def of(self, role: str, path: Path) -> dict[str, Any]:
        try:
            st = path.stat()
        except OSError as exc:
            return {"role": role, "path": str(path), "error": f"cannot read: {exc.strerror}"}
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._cache:
            from inference.errors import ModelError
            from inference.modelfile import read_metadata, sha256_of

            try:
                meta = read_metadata(path).to_dict()
                self._cache[key] = {
                    "role": role,
                    "path": str(path),
                    "size": st.st_size,
                    "sha256": sha256_of(path),
                    **meta,
                }
            except ModelError as exc:
                return {"role": role, "path": str(path), "error": str(exc)}
        return self._cache[key]


SMALL_FORM_BYTES = 16 * 1024  # a login or logout form, at most


async def bounded_form(request: Request, max_bytes: int, max_files: int = 0, setting: str = "") -> Any:
    """The request's form, or the response refusing it: a POST must say its length (no chunked bodies), which
    must not exceed ``max_bytes``, so that nobody can fill the disk or memory through a form."""
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        return PlainTextResponse("a form must come with a Content-Length\n", status_code=411)
    if int(length) > max_bytes:
        limit = f"{setting} ({max_bytes / 1e6:g} MB)" if setting else f"{max_bytes / 1e6:g} MB"
        return PlainTextResponse(f"the form is larger than {limit}\n", status_code=413)
    return await request.form(max_files=max_files, max_fields=20)


class Console:
    def __init__(self, config: Config, store: Store, load_pipeline: Callable[[], Pipeline]):
        self.config = config
        self.store = store
        self.queries = Queries(store)
        self.users = config.web.all_users()
        self.throttle = LoginThrottle()
        self.dummy_hash = hash_password(secrets.token_urlsafe(16))
        self.pipeline = LazyPipeline(load_pipeline)
        self.models = ModelFacts()
        self.pair = PairFacts()  # the configured pair's sha256s without torch (site validation)
        self.drift = DriftWatch(config, store)  # live traffic against the latest validation
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.filters.update(ago=_ago, when=_when, mb=_mb)
        env.globals.update(version=__version__, states=STUDY_STATES)

    # ---- plumbing -------------------------------------------------------------------------------------
    def routes(self) -> list:
        return [
            Route("/", self.page(self.overview)),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/studies", self.page(self.studies)),
            Route("/studies/{uid}", self.page(self.study)),
            Route("/studies/{uid}/reanalyse", self.action(self.reanalyse), methods=["POST"]),
            Route("/deliveries/{delivery_id:int}/retry", self.action(self.retry), methods=["POST"]),
            Route("/results/{result_id:int}.png", self.page(self.overlay_png)),
            Route("/analyse", self.page(self.analyse_form)),
            Route("/analyse", self.action(self.analyse), methods=["POST"]),
            Route("/models", self.page(self.model_page)),
            Route("/studies/{uid}/verdict", self.action(self.verdict), methods=["POST"]),
            Route("/validation", self.page(self.validation_page)),
            Route("/validation/run", self.action(self.validate_now), methods=["POST"]),
            Route("/validation/{validation_id:int}/report", self.page(self.validation_report)),
            Route("/drift", self.page(self.drift_page)),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]

    def render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        session = request.scope.get("session", {})
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(24)
        context.update(user=session.get("user"), csrf=session["csrf"], path=request.url.path)
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    def page(self, handler: Handler) -> Handler:
        """A GET page: logged-in users only (others go to the login form)."""

        async def wrapped(request: Request) -> Response:
            if not self.users:
                return self.render(request, "no_users.html", status_code=503)
            user = request.session.get("user")
            if not user or user not in self.users:
                return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
            return await handler(request, user)

        return wrapped

    def action(self, handler: Handler) -> Handler:
        """A POST: logged in, with the session's CSRF token in the form."""

        async def wrapped(request: Request) -> Response:
            user = request.session.get("user")
            if not self.users or not user or user not in self.users:
                return PlainTextResponse("log in first\n", status_code=401)
            limit_mb = self.config.web.max_upload_mb
            form = await bounded_form(request, int(limit_mb * 1e6), max_files=100, setting="web.max_upload_mb")
            if isinstance(form, Response):
                return form
            token = form.get("csrf")  # parsed once, kept for the handler
            if not csrf_ok(request.session, str(token) if token else None):
                return PlainTextResponse("the form expired or did not come from this console; reload it\n", 403)
            return await handler(request, user)

        return wrapped

    # ---- login ----------------------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        if not self.users:
            return self.render(request, "no_users.html", status_code=503)
        nxt = request.query_params.get("next", "/")
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"
        if request.method == "GET":
            return self.render(request, "login.html", next=nxt)
        client = request.client.host if request.client else "?"
        form = await bounded_form(request, SMALL_FORM_BYTES)
        if isinstance(form, Response):
            return form
        if not csrf_ok(request.session, str(form.get("csrf") or "")):
            return self.render(request, "login.html", 403, next=nxt, error="The form expired; please try again.")
        if self.throttle.blocked(client):
            audit.event("console_login", peer=client, result="throttled")
            return self.render(request, "login.html", 429, next=nxt, error="Too many failed logins; wait 5 minutes.")
        name, password = str(form.get("username") or ""), str(form.get("password") or "")
        hashed = self.users.get(name)
        # an unknown name costs a password check too, so that the answer's timing does not tell names apart
        ok = await run_in_threadpool(verify_password, password, hashed or self.dummy_hash) and hashed is not None
        if not ok:
            self.throttle.failed(client)
            audit.event("console_login", peer=client, user=name[:64], result="failed")
            return self.render(request, "login.html", 401, next=nxt, error="Wrong user name or password.")
        self.throttle.succeeded(client)
        request.session.clear()
        request.session.update(user=name, csrf=secrets.token_urlsafe(24))
        audit.event("console_login", peer=client, user=name, result="ok")
        return RedirectResponse(nxt, status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await bounded_form(request, SMALL_FORM_BYTES)
        if isinstance(form, Response):
            return form
        if csrf_ok(request.session, str(form.get("csrf") or "")):
            request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ---- pages ----------------------------------------------------------------------------------------
    async def overview(self, request: Request, user: str) -> Response:
        def gather() -> dict[str, Any]:
            status = self.store.status()
            disk = shutil.disk_usage(self.store.spool.root)
            return {
                "status": status,
                "throughput": self.queries.throughput(),
                "workers": self.queries.workers(),
                "nodes": self.store.nodes(STALE_S),  # the serve instances sharing this database
                "destinations": self.queries.destinations([d.name for d in self.config.destinations]),
                "backfill": self.store.backfill_progress(limit=5),  # retrospective pulls from the PACS
                "disk": {
                    "free_mb": disk.free / 2**20,  # MiB, as storage.min_free_disk_mb is checked
                    "total_mb": disk.total / 2**20,
                    "floor_mb": self.config.storage.min_free_disk_mb,
                },
            }

        data = await run_in_threadpool(gather)
        data["unvalidated_live"] = await run_in_threadpool(self._unvalidated_live)
        peak = max([1] + [b[k] for b in data["throughput"] for k in ("received", "analysed", "sent")])
        return self.render(request, "overview.html", peak=peak, **data)

    async def studies(self, request: Request, user: str) -> Response:
        q = request.query_params
        state = q.get("state") or None
        if state not in (None, *STUDY_STATES):
            state = None
        try:
            day = date.fromisoformat(q["date"]).isoformat() if q.get("date") else None
        except ValueError:
            day = None
        reason = (q.get("skipped") or "").strip()[:100] or None
        try:
            page_no = int(q.get("page", "1"))
        except ValueError:
            page_no = 1
        page = await run_in_threadpool(self.queries.studies, page_no, self.config.web.page_size, state, day, reason)
        filters = {"state": state or "", "date": day or "", "skipped": reason or ""}
        return self.render(request, "studies.html", page=page, filters=filters)

    async def study(self, request: Request, user: str) -> Response:
        uid = request.path_params["uid"]
        detail = await run_in_threadpool(self.queries.study, uid)
        if detail is None:
            return self.render(
                request, "message.html", 404, title="No such study", text="No study with this UID is stored."
            )
        patient = await run_in_threadpool(_patient_header, [self.store.spool.resolve(i.path) for i in detail.instances])
        verdicts = {v.sop_instance_uid: v for v in detail.images}
        overlays = {r.source_sop_uid: r for r in detail.results if r.kind == "sc"}
        return self.render(
            request,
            "study.html",
            d=detail,
            patient=patient,
            verdicts=verdicts,
            overlays=overlays,
            notice=request.query_params.get("notice"),
            truth=await run_in_threadpool(self.store.ground_truth_of, uid),
            finding_classes=FINDING_CLASSES,
            retrospective=await run_in_threadpool(self.store.is_retrospective, uid),
        )

    async def reanalyse(self, request: Request, user: str) -> Response:
        uid = request.path_params["uid"]
        try:
            job = await run_in_threadpool(self.store.reanalyze, uid)
        except UnknownStudyError:
            return RedirectResponse(f"/studies/{uid}?notice=nothing+to+re-analyse", status_code=303)
        audit.event("console_reanalyse", user=user, study=audit.study_key(uid), job=job)
        return RedirectResponse(f"/studies/{uid}?notice=re-analysis+queued+(job+{job})", status_code=303)

    async def retry(self, request: Request, user: str) -> Response:
        delivery_id = request.path_params["delivery_id"]
        uid = await run_in_threadpool(self.queries.delivery_study, delivery_id)
        if uid is None:
            return self.render(request, "message.html", 404, title="No such delivery", text="It may have been purged.")
        ok = await run_in_threadpool(self.store.retry_failed, delivery_id) == 1
        if ok:
            audit.event("console_retry", user=user, delivery=delivery_id)
        notice = f"delivery+{delivery_id}+queued+again" if ok else f"delivery+{delivery_id}+is+not+failed"
        return RedirectResponse(f"/studies/{uid}?notice={notice}", status_code=303)

    async def overlay_png(self, request: Request, user: str) -> Response:
        result = await run_in_threadpool(self.queries.result, request.path_params["result_id"])
        if result is None or result.kind != "sc":
            return PlainTextResponse("no such overlay\n", status_code=404)
        png = await run_in_threadpool(_sc_png, self.store.spool.resolve(result.path))
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def analyse_form(self, request: Request, user: str) -> Response:
        return self.render(request, "analyse.html", results=None, limit_mb=self.config.web.max_upload_mb)

    async def analyse(self, request: Request, user: str) -> Response:
        form = await request.form()  # parsed (and size-checked) by action()
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile) and f.filename]
        if not uploads:
            return self.render(
                request,
                "analyse.html",
                400,
                results=None,
                limit_mb=self.config.web.max_upload_mb,
                error="Choose one or more DICOM, PNG or JPEG files.",
            )
        with tempfile.TemporaryDirectory(prefix="dicom-node-analyse-") as tmp:
            inputs = []
            for n, up in enumerate(uploads):
                name = Path(up.filename or f"upload-{n}").name or f"upload-{n}"
                target = Path(tmp) / "in" / str(n) / name
                target.parent.mkdir(parents=True)
                with target.open("wb") as f:
                    while chunk := await up.read(1 << 20):
                        f.write(chunk)
                inputs.append(target)
            results = await run_in_threadpool(self._analyse_files, inputs, Path(tmp) / "out")
        audit.event("console_analyse", user=user, files=len(inputs))
        return self.render(request, "analyse.html", results=results, limit_mb=self.config.web.max_upload_mb)

    def _analyse_files(self, inputs: list[Path], out: Path) -> list[dict[str, Any]]:
        from dicom_node.work.offline import analyze_files

        with self.pipeline.lock:
            t0 = time.perf_counter()
            results = analyze_files(self.pipeline.get(), inputs, out)
            log.info("console: analysed %d uploaded file(s) in %.2f s", len(inputs), time.perf_counter() - t0)
        shown = []
        for path, r in zip(inputs, results):
            r = dict(r)
            overlay = r.pop("overlay", None)
            r.pop("json", None)
            r["file"] = path.name  # not the temporary path
            shown.append(
                {
                    "name": path.name,
                    "result": r,
                    "overlay": base64.b64encode(Path(overlay).read_bytes()).decode() if overlay else None,
                    "json": base64.b64encode((json.dumps(r, indent=2) + "\n").encode()).decode(),
                }
            )
        return shown

    async def model_page(self, request: Request, user: str) -> Response:
        m = self.config.inference.models

        def gather() -> dict[str, Any]:
            files = [self.models.of("classifier", m.classifier), self.models.of("detector", m.detector)]
            card = None
            for folder in {m.classifier.parent, m.detector.parent}:
                if (folder / "MODEL_CARD.md").is_file():
                    card = (folder / "MODEL_CARD.md").read_text(encoding="utf-8", errors="replace")
            validation, problem = self.pair.latest_validation(self.config, self.store)
            return {
                "files": files,
                "card": card,
                "workers": self.queries.workers(),
                "validation": validation,
                "validation_problem": problem,
            }

        return self.render(request, "models.html", **await run_in_threadpool(gather))

    # ---- site ground truth and validation ----------------------------------------------------------------
    def _unvalidated_live(self) -> list[str]:
        """Live destinations served by a model pair without site validation (the overview warns)."""
        live = [d.name for d in self.config.destinations if getattr(d, "mode", "live") == "live"]
        if not live:
            return []
        validation, _ = self.pair.latest_validation(self.config, self.store)
        return [] if validation is not None else live

    async def verdict(self, request: Request, user: str) -> Response:
        uid = request.path_params["uid"]
        form = await request.form()  # parsed (and size-checked) by action()
        verdict = str(form.get("verdict") or "")
        finding = str(form.get("finding") or "").strip()
        note = str(form.get("note") or "").strip()[:1000]
        back = f"/studies/{quote(uid)}?notice="
        if verdict == "missed" and finding not in FINDING_CLASSES:
            return RedirectResponse(back + quote_plus("choose which finding was missed"), status_code=303)
        try:
            rec = await run_in_threadpool(self.store.record_verdict, uid, verdict, user, finding, note)
        except UnknownStudyError:
            return self.render(
                request, "message.html", 404, title="No such study", text="No study with this UID is stored."
            )
        except ValueError as exc:
            return RedirectResponse(back + quote_plus(str(exc)), status_code=303)
        label = "abnormal" if rec.abnormal else "normal"
        audit.event("console_verdict", user=user, study=audit.study_key(uid), verdict=verdict, label=label)
        text = f"verdict recorded: {verdict}; ground truth {label}" + (f" ({finding})" if rec.findings else "")
        return RedirectResponse(back + quote_plus(text), status_code=303)

    async def validation_page(self, request: Request, user: str) -> Response:
        def gather() -> dict[str, Any]:
            validation, problem = self.pair.latest_validation(self.config, self.store)
            return {
                "validations": self.store.validations(),
                "current": validation,
                "problem": problem,
            }

        data = await run_in_threadpool(gather)
        return self.render(request, "validation.html", notice=request.query_params.get("notice"), **data)

    async def validate_now(self, request: Request, user: str) -> Response:
        from dicom_node.work.site_validation import run_validation
        from inference.errors import InferenceError

        form = await request.form()
        try:
            target = float(str(form.get("target_sensitivity") or "0.9"))
        except ValueError:
            target = -1.0
        if not 0.0 < target < 1.0:
            return RedirectResponse("/validation?notice=" + quote_plus("target sensitivity: 0 to 1"), 303)
        try:
            outcome = await run_in_threadpool(
                run_validation, self.config, self.store, target_sensitivity=target, by=f"console:{user}"
            )
        except InferenceError as exc:  # nothing to validate, or a model file that cannot be read
            return RedirectResponse("/validation?notice=" + quote_plus(str(exc)), status_code=303)
        audit.event("console_validate", user=user, validation=outcome.validation_id, n=outcome.result["n"])
        return RedirectResponse(
            "/validation?notice=" + quote_plus(f"validation {outcome.validation_id} recorded"), status_code=303
        )

    async def drift_page(self, request: Request, user: str) -> Response:
        """Per device: the current window's drift verdict, and each week's PSI and flagged-rate ratio as charts."""

        def gather() -> dict[str, Any]:
            report = self.drift.current()
            weeks = self.drift.weekly() if report.reference is not None else []
            rule = self.drift.rule
            return {
                "report": report,
                "weeks": weeks,
                "rule": rule,
                "charts": [
                    weekly_chart(weeks, "psi", "PSI of P(abnormal) against the validation", (rule.psi_alert,), 0.5),
                    weekly_chart(
                        weeks,
                        "ratio",
                        "Flagged rate / the validation's",
                        (rule.flag_ratio_low, 1.0, rule.flag_ratio_high),
                        2.5,
                    ),
                ]
                if weeks
                else [],
            }

        return self.render(request, "drift.html", **await run_in_threadpool(gather))

    async def validation_report(self, request: Request, user: str) -> Response:
        row = await run_in_threadpool(self.store.validation, request.path_params["validation_id"])
        path = Path(row.report_path) if row is not None and row.report_path else None
        if path is None or not path.is_file():
            return self.render(request, "message.html", 404, title="No such report", text="It may have been removed.")
        # a self-contained file the node wrote: its own inline styles and embedded plots, nothing else
        policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"
        return Response(
            path.read_bytes(), media_type="text/html; charset=utf-8", headers={"content-security-policy": policy}
        )


def _patient_header(paths: list[Path]) -> dict[str, str]:
    """Patient and study fields from the first readable image (for logged-in users' eyes only)."""
    import pydicom

    keys = (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyDescription",
        "AccessionNumber",
        "StudyID",
    )
    for p in paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=list(keys))
        except Exception:  # noqa: BLE001 - a file we cannot read just shows nothing
            continue
        return {k: str(ds.get(k, "") or "") for k in keys}
    return {}


def _sc_png(path: Path) -> bytes:
    import numpy as np
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    arr = np.asarray(ds.pixel_array)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
