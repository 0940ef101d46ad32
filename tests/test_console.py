"""The web console in a real browser (Debian's chromium driven by Playwright) against a real ``dicom-node serve``
with studies sent by ``storescu``: log in, watch the counts change, open a study and see its findings and
overlay, retry a failed delivery and see it delivered, upload a real radiograph on the analyse page, see a
SIGKILLed worker as "dead" on the overview while a study sent meanwhile is still analysed. Without a browser:
pages need a login, POSTs need the CSRF token, patient names stay out of the log.

Screenshots are kept in test-artefacts/console/ (the README shows them).
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from pathlib import Path

import cv2
import pytest

from dicom_node.errors import ConfigError
from dicom_node.passwords import hash_password
from dicom_node.web.auth import MIN_SECRET, session_secret
from support.dcmtk import DcmtkStoreSCP
from support.dicom_factory import make_cxr
from support.node import NodeProcess, free_port, wait_for
from support.viewers import Chromium

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = REPO / "test-artefacts" / "console"
XRAYS = REPO.parent / "shared" / "datasets" / "nih-matched" / "abnormal" / "images"
PASSWORD = "correct horse battery"
PATIENT = "CONSOLE^VISIBLE^ONLY"


@pytest.fixture(scope="module")
def browser():
    with Chromium() as b:
        yield b


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


def shot(page, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / f"{name}.png"), full_page=True)


def log_in(page, base: str) -> None:
    page.goto(f"{base}/")
    assert page.url.startswith(f"{base}/login")  # every page needs a login
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")


def count(page, section: str, state: str) -> int:
    return int(page.inner_text(f"#count-{section} td[data-state={state}]"))


@pytest.mark.slow  # headless Chromium
def test_console_in_a_browser(tmp_path, node_factory, models, browser, password_hash):
    pacs_port = free_port()  # nothing listens there yet: deliveries fail (one attempt) until the PACS starts
    node: NodeProcess = node_factory(
        workers={"count": 1},
        inference={"models": models},
        studies={"stable_after_s": 0.5},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs_port,
                "outputs": ["sr", "sc"],
                "mode": "live",
            }
        ],
        delivery={"max_attempts": 1, "connect_timeout_s": 2},
        web={"users": {"alice": password_hash}},
    )
    base = node.web_url
    page, log = browser.new_page(width=1400, height=1000)

    # a wrong password is refused, the right one lets in
    page.goto(f"{base}/studies")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert "Wrong user name or password" in page.inner_text("main")
    shot(page, "login")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/studies")

    page.goto(f"{base}/")
    assert count(page, "instances", "total") == 0
    wait_for(lambda: node.status()["workers"]["alive"] == 1, 60, what="a live worker")

    # a study sent by storescu shows up in the counts and in the list
    ds = make_cxr(tmp_path / "a.dcm", rows=512, cols=512, patient_name=PATIENT)
    assert node.storescu(tmp_path / "a.dcm").returncode == 0
    wait_for(lambda: node.status()["deliveries"]["failed"] == 2, 120, what="the study analysed, its deliveries failed")
    page.reload()
    assert count(page, "instances", "total") == 1
    assert count(page, "jobs", "done") == 1
    assert count(page, "deliveries", "failed") == 2
    assert "alive" in page.inner_text("#workers")
    # the destination's health: never reached, both deliveries failed, the last error shown
    assert page.inner_text("#destinations td:nth-child(1)") == "pacs"
    assert page.inner_text("#destinations td:nth-child(2)") == "never"
    assert page.inner_text("#destinations td:nth-child(6)") == "2"
    assert page.inner_text("#destinations td:nth-child(3) .error").strip()
    shot(page, "overview")

    page.click("a[href='/studies']")
    assert page.inner_text("#studies tbody tr .state") == "done"
    shot(page, "studies")
    page.click(f"a[href='/studies/{ds.StudyInstanceUID}']")
    assert PATIENT.replace("^", " ") in page.inner_text("#patient")  # logged-in users see it
    labels = page.locator("#findings td.label").all_inner_texts()
    assert labels, "the tiny detector boxes something; the study page lists it"
    img = page.locator("img.overlay").first
    img.wait_for()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img.element_handle(), timeout=20_000)
    assert img.evaluate("i => i.naturalWidth") == 512  # the Secondary Capture, decoded and served as PNG
    assert page.locator("#deliveries tr.state-failed").count() == 2
    shot(page, "study-failed-delivery")

    # the PACS comes up; "Retry" on each failed delivery and they are delivered
    pacs = DcmtkStoreSCP(tmp_path / "pacs", port=pacs_port).start()
    try:
        while page.locator("button.retry").count():
            page.locator("button.retry").first.click()
            page.wait_for_load_state()
        assert "queued again" in page.inner_text(".notice")

        def delivered() -> int:
            page.reload()
            return page.locator("#deliveries tr.state-delivered").count()

        wait_for(lambda: delivered() == 2, 60, interval=1, what="both deliveries delivered")
        assert len(pacs.received()) == 2
    finally:
        pacs.stop()
    shot(page, "study")

    # re-analyse: a new job, done again
    page.click("#reanalyse")
    assert "re-analysis queued" in page.inner_text(".notice")
    wait_for(lambda: node.status()["jobs"]["done"] == 2, 120, what="the re-analysis")

    # the analyse page: a real radiograph (PNG from the NIH set, as the research project's page took it)
    if not XRAYS.is_dir():
        pytest.fail("../shared/datasets/nih-matched is missing")
    xray = tmp_path / "chest.png"
    assert cv2.imwrite(str(xray), cv2.imread(str(sorted(XRAYS.glob("*.jpg"))[0]), cv2.IMREAD_GRAYSCALE))
    page.goto(f"{base}/analyse")
    page.set_input_files("input[type=file]", str(xray))
    page.click("#analyse")
    section = page.locator(f"section.analysed[data-file='{xray.name}']")
    section.wait_for(timeout=120_000)
    p = float(section.locator(".p-abnormal").inner_text())
    assert 0.0 <= p <= 1.0
    shown = section.locator("img.overlay").element_handle()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=shown, timeout=20_000)  # the overlay PNG
    assert section.locator("a.json").get_attribute("href").startswith("data:application/json;base64,")
    shot(page, "analyse")

    page.goto(f"{base}/models")
    assert page.inner_text("#model-classifier .version") and len(page.inner_text("#model-detector .sha256")) == 64
    shot(page, "models")

    # a worker killed with SIGKILL is "dead" on the overview until the supervisor restarts it; a study sent
    # meanwhile is still analysed
    (row,) = node.rows("SELECT pid FROM workers")
    os.kill(row["pid"], signal.SIGKILL)

    def overview_worker_state() -> str:
        page.goto(f"{base}/")
        return page.inner_text("#workers tbody tr .state")

    wait_for(lambda: overview_worker_state() == "dead", 15, interval=0.2, what="the overview to show the dead worker")
    shot(page, "overview-worker-dead")
    make_cxr(tmp_path / "b.dcm", patient_name=PATIENT)
    assert node.storescu(tmp_path / "b.dcm").returncode == 0
    wait_for(lambda: overview_worker_state() == "alive", 90, interval=1, what="the restarted worker")
    wait_for(lambda: node.status()["jobs"]["done"] == 3, 120, what="the study sent while the worker was dead")

    assert log.page_errors == [] and log.blocked_requests == []
    assert PATIENT not in node.log() and "CONSOLE" not in node.log()  # shown to users, never logged


def post(url: str, data: dict, cookie: str | None = None) -> tuple[int, str, Message]:
    """(status, body, headers) of a form POST; redirects are not followed."""
    req = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), method="POST")
    if cookie:
        req.add_header("Cookie", cookie)
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_console_needs_a_login_and_the_csrf_token(node_factory, models, password_hash):
    node = node_factory(workers={"count": 0}, inference={"models": models}, web={"users": {"alice": password_hash}})
    base = node.web_url
    for path in ("/", "/studies", "/analyse", "/models"):  # a page: off to the login form
        req = urllib.request.Request(f"{base}{path}")
        try:
            urllib.request.build_opener(NoRedirect).open(req, timeout=10)
            raise AssertionError(f"{path} answered without a login")
        except urllib.error.HTTPError as e:
            assert e.code == 303 and e.headers["Location"].startswith("/login"), (path, e.code)
    assert post(f"{base}/deliveries/1/retry", {})[0] == 401  # an action: refused

    # log in (the form's CSRF token comes with the session cookie), then POST without / with a wrong token
    with urllib.request.urlopen(f"{base}/login", timeout=10) as r:
        cookie = r.headers["Set-Cookie"].split(";")[0]
        token = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
    assert post(f"{base}/login", {"username": "alice", "password": PASSWORD}, cookie)[0] == 403  # no token
    # nobody fills the disk or memory through the login form: a large form, or one without a length, is refused
    assert post(f"{base}/login", {"username": "x" * 20_000, "csrf": token}, cookie)[0] == 413
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(base).netloc, timeout=10)
    conn.request(
        "POST", "/login", body=iter([b"username=alice&", b"password=x"]), encode_chunked=True,
        headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert conn.getresponse().status == 411
    conn.close()
    code, _, headers = post(f"{base}/login", {"username": "alice", "password": PASSWORD, "csrf": token}, cookie)
    assert code == 303 and headers["location"] == "/"  # logged in
    set_cookie = headers["set-cookie"]
    assert "samesite=strict" in set_cookie.lower() and "httponly" in set_cookie.lower()
    cookie = set_cookie.split(";")[0]
    assert post(f"{base}/studies/1.2.3/reanalyse", {"csrf": token}, cookie)[0] == 403  # the pre-login token is gone
    assert post(f"{base}/studies/1.2.3/reanalyse", {}, cookie)[0] == 403
    assert post(f"{base}/studies/1.2.3/reanalyse", {"csrf": "forged"}, cookie)[0] == 403
    req = urllib.request.Request(f"{base}/studies", headers={"Cookie": cookie})
    with urllib.request.urlopen(req, timeout=10) as r:  # the logged-in session's own token is accepted
        assert r.url.endswith("/studies")
        token = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
    code, _, headers = post(f"{base}/studies/1.2.3/reanalyse", {"csrf": token}, cookie)
    assert code == 303 and "nothing+to+re-analyse" in headers["location"]
    # the metrics and health endpoints need no login
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        assert r.status == 200
    audit = (node.folder / "var" / "audit.jsonl").read_text()
    assert '"event": "console_login"' in audit and '"result": "ok"' in audit and PASSWORD not in audit


def test_console_without_users_says_how_to_add_one(node_factory, models):
    node = node_factory(workers={"count": 0}, inference={"models": models})
    try:
        urllib.request.urlopen(f"{node.web_url}/", timeout=10)
        raise AssertionError("the console opened without any user configured")
    except urllib.error.HTTPError as e:
        assert e.code == 503 and "dicom-node hash-password" in e.read().decode()


def test_the_session_key_is_never_short(tmp_path, monkeypatch):
    """A guessable key would let anyone forge a logged-in session cookie."""
    monkeypatch.delenv("DICOM_NODE_WEB_SECRET", raising=False)
    key_file = tmp_path / "web-session.key"
    key_file.write_text("")  # e.g. left empty by a full disk
    key = session_secret(tmp_path)
    assert len(key) >= MIN_SECRET and key_file.read_text().strip() == key
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert session_secret(tmp_path) == key  # kept across restarts
    monkeypatch.setenv("DICOM_NODE_WEB_SECRET", "short")
    with pytest.raises(ConfigError, match="at least 32 characters"):
        session_secret(tmp_path)
