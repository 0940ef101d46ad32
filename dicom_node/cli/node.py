"""The node's own commands (serve, check-config, status, worker, retry, release, reanalyze, analyze,
hash-password) and
the main parser, which lists the training commands by name only (:mod:`dicom_node.cli.command_table`); the go-live
commands ground-truth and validate are :mod:`dicom_node.cli.golive`'s.

Nothing here imports training code (an import contract in ``pyproject.toml`` checks it): ``serve``, ``worker``,
``status`` and ``check-config`` never load it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dicom_node import __version__
from dicom_node.cli import backfill, golive
from dicom_node.cli.command_table import TRAINING_COMMANDS
from dicom_node.config import (
    Config,
    DicomWebDestinationConfig,
    FHIRDestinationConfig,
    HL7DestinationConfig,
    NotificationConfig,
    WebhookDestinationConfig,
    load_config,
)
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.logs import setup_logging

if TYPE_CHECKING:
    from storage import Store


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_check_config(args: argparse.Namespace) -> int:
    """The configuration, then both model files (metadata and weights) as a worker loads them."""
    from dicom_node.factories import build_pipeline, describe_pipeline

    cfg = _config(args)
    users = cfg.web.all_users()  # DICOM_NODE_WEB_USERS too
    try:
        pipeline = build_pipeline(cfg)
    except DicomNodeError as exc:
        raise ConfigError(f"inference.models: {exc}") from exc
    print(
        f"configuration OK: AE {cfg.node.ae_title} on {cfg.node.host}:{cfg.node.port}, "
        f"storage {cfg.storage.root}, {len(cfg.destinations)} destination(s)"
    )
    print(f"models OK: {describe_pipeline(pipeline)}")
    for line in _destination_lines(cfg):
        print(line)
    if cfg.web.enabled:
        print(
            f"web console on http://{cfg.web.host}:{cfg.web.port}: "
            + (f"{len(users)} user(s)" if users else "no users yet (dicom-node hash-password, then web.users)")
        )
    return 0


def _destination_lines(cfg: Config) -> list[str]:
    """One line per destination: silent (results held), or live, with a warning when the configured model pair has
    no site validation (read from storage; the node may be running)."""
    lines = [
        f"destination {d.name}: silent (results kept and shown in the console, not sent; mode: live sends them)"
        for d in cfg.destinations
        if d.mode == "silent"
    ]
    lines += [line for d in cfg.notification_destinations for line in _notification_lines(d)]
    for d in cfg.destinations:
        if isinstance(d, DicomWebDestinationConfig):
            lines.append(f"destination {d.name}: STOW-RS to {urlsplit(d.url).hostname}, one request per study")
            lines += [
                f"WARNING: destination {d.name}: the environment variable {env} is not set here"
                for env in (d.password_env, d.token_env)
                if env and not os.environ.get(env)
            ]
    live = [d.name for d in cfg.destinations if d.mode == "live"]
    if live:
        from dicom_node.factories import open_store
        from dicom_node.work.site_validation import PairFacts, sr_parameter

        store = open_store(cfg)
        try:
            validation, why = PairFacts().latest_validation(cfg, store)
        finally:
            store.close()
        for name in live:
            if validation is None:
                lines.append(
                    f"WARNING: destination {name} is live, but these model files have no site validation"
                    f"{f' ({why})' if why else ''}: radiologists see results nobody measured here "
                    "(README, Go live: backfill, ground-truth, validate)"
                )
            else:
                lines.append(f"destination {name}: live; models {sr_parameter(validation)}")
    return lines


def _notification_lines(d: NotificationConfig) -> list[str]:
    """What a notification destination gets (never its URL's path or a secret: a webhook URL's path is one), and a
    warning per secret's environment variable that is not set here."""
    if isinstance(d, HL7DestinationConfig):
        where = f"HL7 ORU over MLLP{' (TLS)' if d.tls else ''} to {d.host}:{d.port}"
    elif isinstance(d, FHIRDestinationConfig | WebhookDestinationConfig):
        kind = "FHIR Bundle" if isinstance(d, FHIRDestinationConfig) else f"{d.format} webhook"
        where = f"{kind} to {urlsplit(d.url).netloc}"
    else:
        where = f"email via {d.host}:{d.port} to {len(d.to)} recipient(s)"
    which = "every study" if d.when == "always" else "urgent studies only"
    phi = "with patient name and ID" if d.include_phi else "without patient data"
    line = f"destination {d.name}: {where}, {which}, {phi}"
    if isinstance(d, HL7DestinationConfig | FHIRDestinationConfig) and not d.include_phi:
        line += " (a RIS files results by patient identifiers: it needs include_phi: true)"
    lines = [line]
    for env in (getattr(d, "token_env", None), getattr(d, "hmac_key_env", None), getattr(d, "password_env", None)):
        if env and not os.environ.get(env):
            lines.append(f"WARNING: destination {d.name}: the environment variable {env} is not set here")
    return lines


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print a password hash for ``web.users`` (the password is read from the terminal, or one line of stdin)."""
    import getpass

    from dicom_node.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password for the web console: ")
        if password != getpass.getpass("again: "):
            raise ConfigError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        raise ConfigError("a console password needs at least 8 characters")
    print(hash_password(password))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.app import Node

    cfg = _config(args)
    setup_logging(cfg.logging.level)

    def announce(port: int) -> None:  # on stdout whatever the log level: scripts and tests read the port here
        print(f"dicom-node {__version__} listening as {cfg.node.ae_title} on {cfg.node.host}:{port}", flush=True)

    Node(cfg).run_forever(announce)
    return 0


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[Store]:
    """The node's storage for one command (works with the node running or stopped)."""
    from dicom_node.factories import open_store

    store = open_store(_config(args))
    try:
        yield store
    finally:
        store.close()


def cmd_status(args: argparse.Namespace) -> int:
    with _store(args) as store:
        report = store.status()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for section in ("instances", "studies", "jobs", "deliveries", "workers", "purged"):
        print(f"{section:11s} " + "  ".join(f"{k}={v}" for k, v in report[section].items()))
    age = report["oldest_queued_job_age_s"]
    print(f"oldest queued job: {'-' if age is None else f'{age:.0f} s'}; urgent queued: {report['urgent_queued_jobs']}")
    for k, v in report["last_activity"].items():
        print(f"last {k.replace('_', ' ')}: {v or '-'}")
    for n in report["nodes"]:  # the serve instances sharing this database
        print(f"instance    {n['name']} {n['state']} {n['role']} dicom={n['dicom'] or '-'} web={n['web'] or '-'}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.app import worker_main

    cfg = _config(args)
    setup_logging(cfg.logging.level)
    from dicom_node.membership import default_instance_name

    host = (cfg.node.instance_name or default_instance_name())[:40]
    worker_main(cfg.model_dump(mode="json"), f"{host}-worker-{os.getpid()}", None)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with _store(args) as store:
        n = store.retry_failed()
    print(f"re-queued {n} failed deliver{'y' if n == 1 else 'ies'}; the running node sends them now")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Send results held while a destination was silent (all, since a date, or one study's)."""
    from datetime import UTC, datetime

    from dicom_node.cli.exit_codes import UsageError

    cfg = _config(args)
    dest = next((d for d in cfg.destinations if d.name == args.destination), None)
    if dest is None:
        names = ", ".join(d.name for d in cfg.destinations) or "none configured"
        raise UsageError(f"no destination named {args.destination!r} ({names})")
    if dest.mode != "live":
        raise UsageError(f"destination {dest.name!r} is silent: set its mode: live first (held results stay held)")
    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since).astimezone(UTC).replace(tzinfo=None)
        except ValueError:
            raise UsageError(f"--since {args.since!r}: expected a date or time, e.g. 2026-12-01") from None
    if since is None and args.study_uid is None and not args.all:
        raise UsageError("say which held results to send: --all, --since DATE or --study-uid UID")
    with _store(args) as store:
        n = store.release_held(dest.name, since, args.study_uid)
    print(f"queued {n} held deliver{'y' if n == 1 else 'ies'} to {dest.name}; the running node sends them now")
    return 0


def cmd_reanalyze(args: argparse.Namespace) -> int:
    """Queue a re-analysis of a study the node holds; one it does not hold (never received, purged by retention, or
    its files gone) is fetched from ``backfill.source`` first, by the running ``serve``, then analysed and delivered.
    """
    cfg = _config(args)
    with _store(args) as store:
        holding = store.study_holding(args.study_uid)
        if not holding.instances or holding.missing:
            why = (
                f"{holding.missing} of its {holding.eligible} image files are gone"
                if holding.missing
                else "never received, or purged by retention"
            )
            return backfill.fetch_for_reanalysis(cfg, store, args.study_uid, why)
        job_id = store.reanalyze(args.study_uid)  # UnknownStudyError when none of its instances is eligible
        retrospective = store.is_retrospective(args.study_uid)
    if retrospective:
        print(f"queued job {job_id}: re-analysis of the study; a backfill pulled it: results are kept, not delivered")
    else:
        print(f"queued job {job_id}: re-analysis of the study; results go to the configured destinations")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from dicom_node.factories import build_pipeline
    from dicom_node.work.offline import analyze_files, expand_inputs

    cfg = _config(args)
    setup_logging("WARNING")
    files = expand_inputs(args.files)
    if not files:
        print("dicom-node: no input files", file=sys.stderr)
        return 2
    results = analyze_files(build_pipeline(cfg), files, args.output)
    for r in results:
        if "error" in r:
            print(f"{r['file']}: ERROR {r['error']}")
            continue
        if r.get("not_analysable"):
            print(f"{r['file']}: not analysable: {r['not_analysable']}")
            continue
        verdict = "abnormal" if r["abnormal"] else "no finding"
        print(f"{r['file']}: {verdict} (P(abnormal) {r['p_abnormal']:.2f}, P(no finding) {r['p_no_finding']:.2f})")
        for f in r["findings"]:
            x0, y0, x1, y1 = f["box"]
            print(f"  {f['label']:<20s} {f['score']:.2f}  box [{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}]")
    print(f"results written to {Path(args.output).resolve()}")
    return 1 if any("error" in r for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description="Chest X-ray AI DICOM node")
    p.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", "-c", default=None, help="config file (default: ./config.yaml, else defaults)")
        sp.set_defaults(func=func)
        return sp

    command("serve", cmd_serve, "receive images, analyse studies, send results (runs until SIGTERM/SIGINT)")
    command("check-config", cmd_check_config, "validate the configuration file and exit")
    command("status", cmd_status, "counts of instances, studies, jobs and deliveries (no patient data)").add_argument(
        "--json", action="store_true", help="print the documented JSON form"
    )
    command("hash-password", cmd_hash_password, "print a password hash for web.users (the console's logins)")
    command("worker", cmd_worker, "run one analysis worker against the same storage (add more to scale out)")
    command("retry", cmd_retry, "re-queue every failed delivery")
    sp = command("release", cmd_release, "send results held while a destination was silent (after it went live)")
    sp.add_argument("destination", help="the destination's name (destinations[].name)")
    sp.add_argument("--all", action="store_true", help="every held result of this destination")
    sp.add_argument("--since", help="only results made since this date/time (ISO, e.g. 2026-12-01)")
    sp.add_argument("--study-uid", help="only this study's results")
    command(
        "reanalyze", cmd_reanalyze, "queue a re-analysis of a study (one not held here is fetched from backfill.source)"
    ).add_argument("study_uid", help="Study Instance UID")
    sp = command("analyze", cmd_analyze, "analyse DICOM, PNG or JPEG files offline; writes JSON + overlay PNG")
    sp.add_argument("files", nargs="+", help="files or folders")
    sp.add_argument("--output", "-o", default="analysis", help="output folder (default: ./analysis)")
    golive.add_commands(command)
    backfill.add_command(command)
    for name, help in TRAINING_COMMANDS.items():  # listed here; parsed by dicom_node.cli.offline
        sub.add_parser(name, help=help + f" (see: dicom-node {name} --help)", add_help=False)
    return p
