"""Orthanc auto-routing plugin: send chest radiographs to the dicom-node AI node, and never lose one.

Loaded by Orthanc's Python plugin (Debian: orthanc-python) through "PythonScript" in orthanc.json; settings
in the "DicomNodeRouting" section of the same file (defaults below).

What it does
------------
- When a study is stable (no new instance for "StableAge" seconds), its CR and DX images of the chest
  (BodyPartExamined CHEST, THORAX or LUNG, or none) go to the node's modality in one asynchronous
  store job (``POST /modalities/{node}/store``), a job Orthanc lists under "Jobs" with its outcome.
- A job that fails (node down, network, refused) is resubmitted with exponential backoff
  (RetryInitialSeconds, doubling up to RetryMaxSeconds) until it succeeds; every failure is logged with
  Orthanc's reason. Failed routing jobs left from before a restart of Orthanc are taken up again at start
  ("SaveJobs": true keeps them, "JobsHistorySize" must be large enough to keep them listed).
- Each image is sent once: when the node's results arrive the study becomes stable again, and only images
  not yet in a routing job are sent (the node would store a second copy once anyway).
- Loop protection: what the node sends back (SR, Secondary Capture, GSPS, stored with the node's AE title
  as calling AE) is never routed. The node's AE title is read from its "DicomModalities" entry, so AE
  title, host and port are set in one place.

Why not ``SendToModality`` from Lua's OnStoredInstance: Orthanc 1.10 reports that Lua job "Success" even
when the node is down (the error is only in its log), so a study could be lost without anyone seeing it.
The node stores each SOP instance once, so a resubmitted job that sends an image twice does no harm.
"""

from __future__ import annotations

import collections
import json
import threading
import time

import orthanc

DEFAULTS = {
    "Modality": "ainode",  # the node's name in "DicomModalities"
    "Modalities": ["CR", "DX"],
    "BodyParts": ["CHEST", "THORAX", "LUNG", ""],  # "" = no BodyPartExamined (common): routed
    "SkipNodeOutputs": True,  # never route instances the node sent (loop protection)
    "RouteEverything": False,  # route every instance of a stable study, outputs included (testing only)
    "Enabled": True,
    "RetryInitialSeconds": 10,
    "RetryMaxSeconds": 600,
}


def _settings() -> dict:
    config = json.loads(orthanc.GetConfiguration())
    settings = dict(DEFAULTS, **config.get("DicomNodeRouting", {}))
    entry = config.get("DicomModalities", {}).get(settings["Modality"])
    if entry is None:
        raise RuntimeError(f'route_chest_xrays: no modality named "{settings["Modality"]}" in DicomModalities')
    # An entry is either [ "AET", "host", port ] or { "AET" : ..., "Host" : ..., "Port" : ... }
    settings["NodeAet"] = (entry["AET"] if isinstance(entry, dict) else entry[0]).strip().upper()
    return settings


SETTINGS = _settings()
SENT_REMEMBERED = 100_000  # instance ids kept to avoid sending an image twice (a forgotten one is sent again)


def _get(uri: str):
    return json.loads(orthanc.RestApiGet(uri))


def _norm(value) -> str:
    return str(value or "").strip().upper()


class Router:
    """The routing jobs in flight: job id -> (study id, what was sent, attempts, when to look again)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, dict] = {}
        # instances in a job already (a study is stable again when results arrive); the oldest are forgotten
        self.sent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.stop = threading.Event()

    # ---- what to send ----------------------------------------------------------------------------------
    def chest_instances(self, study_id: str) -> list[str]:
        wanted: list[str] = []
        for series in _get(f"/studies/{study_id}/series"):
            tags = series.get("MainDicomTags", {})
            chest = (
                _norm(tags.get("Modality")) in SETTINGS["Modalities"]
                and _norm(tags.get("BodyPartExamined")) in SETTINGS["BodyParts"]
            )
            if not (chest or SETTINGS["RouteEverything"]):
                continue
            for instance_id in series.get("Instances", []):
                if instance_id in self.sent:
                    continue
                if SETTINGS["SkipNodeOutputs"] and self.sent_by_node(instance_id):
                    continue
                wanted.append(instance_id)
        return wanted

    @staticmethod
    def sent_by_node(instance_id: str) -> bool:
        metadata = _get(f"/instances/{instance_id}/metadata?expand")
        return metadata.get("Origin") == "DicomProtocol" and _norm(metadata.get("RemoteAET")) == SETTINGS["NodeAet"]

    # ---- jobs ------------------------------------------------------------------------------------------
    def route_study(self, study_id: str) -> None:
        instances = self.chest_instances(study_id)
        if not instances:
            orthanc.LogWarning(f"route_chest_xrays: study {study_id}: nothing to route")
            return
        self.submit(study_id, instances, attempts=0)

    def submit(self, study_id: str, instances: list[str], attempts: int) -> None:
        body = json.dumps({"Resources": instances, "Asynchronous": True, "Priority": 0})
        job = json.loads(orthanc.RestApiPost(f"/modalities/{SETTINGS['Modality']}/store", body))["ID"]
        orthanc.LogWarning(f"route_chest_xrays: study {study_id}: {len(instances)} image(s) to the AI node, job {job}")
        with self.lock:
            self.jobs[job] = {"study": study_id, "instances": instances, "attempts": attempts, "due": 0.0}
            self.sent.update(dict.fromkeys(instances))
            while len(self.sent) > SENT_REMEMBERED:
                self.sent.popitem(last=False)

    def adopt_failed_jobs(self) -> None:
        """Failed routing jobs from before Orthanc's restart are retried too."""
        for job in _get("/jobs?expand"):
            content = job.get("Content", {})
            if job.get("Type") != "DicomModalityStore" or job.get("State") != "Failure":
                continue
            if _norm(content.get("RemoteAet")) != SETTINGS["NodeAet"]:
                continue
            with self.lock:
                self.jobs.setdefault(job["ID"], {"study": "?", "instances": [], "attempts": 1, "due": 0.0})

    def check(self) -> None:
        now = time.monotonic()
        with self.lock:
            due = [(job, dict(state)) for job, state in self.jobs.items() if state["due"] <= now]
        for job, state in due:
            try:
                info = _get(f"/jobs/{job}")
            except Exception:  # noqa: BLE001 - the job left Orthanc's history: send the same images again
                with self.lock:
                    self.jobs.pop(job, None)
                if state["instances"]:
                    self.submit(state["study"], state["instances"], state["attempts"] + 1)
                continue
            if info["State"] == "Success":
                with self.lock:
                    self.jobs.pop(job, None)
                orthanc.LogWarning(f"route_chest_xrays: job {job} delivered to the AI node")
            elif info["State"] == "Failure":
                attempts = state["attempts"] + 1
                delay = min(SETTINGS["RetryMaxSeconds"], SETTINGS["RetryInitialSeconds"] * 2 ** (attempts - 1))
                if state["due"] == 0.0:  # newly failed: wait before resubmitting
                    orthanc.LogWarning(
                        f"route_chest_xrays: job {job} to the AI node failed ({info.get('ErrorDescription')}, "
                        f"{info.get('ErrorDetails', '')}); retry {attempts} in {delay:.0f} s"
                    )
                    with self.lock:
                        self.jobs[job].update(attempts=attempts, due=now + delay)
                    continue
                orthanc.RestApiPost(f"/jobs/{job}/resubmit", "")
                with self.lock:
                    self.jobs[job].update(due=0.0)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - keep retrying whatever happens; say what it was
                orthanc.LogError(f"route_chest_xrays: {type(exc).__name__}: {exc}")


ROUTER = Router()
THREAD = threading.Thread(target=ROUTER.run, name="route-chest-xrays", daemon=True)


def on_change(change_type, level, resource_id) -> None:
    if change_type == orthanc.ChangeType.ORTHANC_STARTED:
        ROUTER.adopt_failed_jobs()
        THREAD.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        ROUTER.stop.set()
    elif change_type == orthanc.ChangeType.STABLE_STUDY and SETTINGS["Enabled"]:
        try:
            ROUTER.route_study(resource_id)
        except Exception as exc:  # noqa: BLE001 - one study must not stop the plugin; it is logged
            orthanc.LogError(f"route_chest_xrays: study {resource_id} not routed: {type(exc).__name__}: {exc}")


orthanc.RegisterOnChangeCallback(on_change)
