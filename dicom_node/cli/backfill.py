"""``dicom-node backfill``: pull a site's past studies from its PACS (retrospective run; issue 20, part 1).

    dicom-node backfill --from 2026-01-01 --to 2026-03-31      CR and DX studies of those dates
    dicom-node backfill --accessions-file list.txt             those studies (one accession number a line)
    dicom-node backfill --status                               runs and their progress
    dicom-node backfill --cancel 3                             stop run 3 (moves under way finish)

The command records the run in the database; the running ``dicom-node serve`` works it (C-FIND, then one C-MOVE
per study to the node itself, within the bounds of ``backfill`` in config.yaml or of this run's options). Unless
``--no-wait``, it follows the run with a progress bar and prints a summary; Ctrl-C stops following, not the run.
No training code and no torch here (:mod:`dicom_node.cli.node` registers the command).

``dicom-node reanalyze`` of a study the node does not hold records the same kind of run, for that one Study UID and
marked ``deliver`` (:func:`fetch_for_reanalysis`): its results are delivered, unlike a backfill's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.cli.exit_codes import EXIT_INTERRUPTED, UsageError
from dicom_node.config import Config, load_config, parse_window

if TYPE_CHECKING:
    from storage import Store
    from storage.backfill import RunProgress

__all__ = ["add_command"]

Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]
FOLLOW_POLL_S = 0.5
DEFAULT_MODALITIES = ("CR", "DX")
QUERY_OPTIONS = (
    "date_from",
    "date_to",
    "modality",
    "accession",
    "accessions_file",
    "study_uid",
    "max_concurrent_moves",
    "studies_per_hour",
    "window",
)


def _date(value: str) -> str:
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date YYYY-MM-DD") from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number (0 = unbounded)")
    return int(value)


def read_accessions(path: Path) -> list[str]:
    """Accession numbers, one a line (the first column of a CSV; a header line "accession..." and blank or
    ``#`` lines are skipped)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"--accessions-file {path}: cannot read ({exc.strerror})") from exc
    out = []
    for i, line in enumerate(text.splitlines()):
        value = line.split(",")[0].strip().strip('"')
        if not value or value.startswith("#") or (i == 0 and value.lower().startswith("accession")):
            continue
        if len(value) > 16 or "\\" in value:
            raise UsageError(f"--accessions-file {path}, line {i + 1}: not an accession number (16 characters at most)")
        out.append(value)
    if not out:
        raise UsageError(f"--accessions-file {path}: no accession numbers in it")
    return out


def _source_missing(what: str) -> UsageError:
    return UsageError(
        f"{what}backfill.source is not configured: add the PACS to pull from to config.yaml, e.g. "
        "backfill: {source: {ae_title: PACS, host: 10.0.0.5, port: 104}} or "
        "backfill: {source: {dicomweb: https://pacs.example.org/dicom-web}}"
    )


def _check_uid(uid: str, option: str) -> None:
    if not uid or len(uid) > 64 or any(c not in "0123456789." for c in uid):
        raise UsageError(f"{option} {uid!r}: not a UID (digits and dots, 64 characters at most)")


def fetch_for_reanalysis(cfg: Config, store: Store, study_uid: str, why: str) -> int:
    """``dicom-node reanalyze`` of a study the node does not hold (``why`` says how): record a run that fetches it
    from ``backfill.source``, marked ``deliver`` (analysed, and its results delivered as a live study's); the
    running ``serve`` works it before any backfill's moves. Returns 0 (UsageError when no source is configured)."""
    _check_uid(study_uid, "STUDY_UID")
    if cfg.backfill.source is None:
        raise _source_missing(f"the study is not held here ({why}) and cannot be fetched: ")
    source = cfg.backfill.source.describe()
    query = {"from": None, "to": None, "modalities": list(DEFAULT_MODALITIES), "accession_numbers": [],
             "study_uids": [study_uid]}  # fmt: skip
    run_id = store.create_backfill_run(query, {"source": source, "deliver": True})
    print(
        f"the study is not held here ({why}): backfill run {run_id} recorded to fetch it from {source}; the running "
        "`dicom-node serve` pulls it, analyses it and sends its results to the configured destinations"
    )
    print(f"follow it with: dicom-node backfill --status (cancel: dicom-node backfill --cancel {run_id})")
    return 0


def _open_store(cfg: Config) -> Store:
    from dicom_node.factories import open_store

    return open_store(cfg)


def cmd_backfill(args: argparse.Namespace) -> int:
    given = [name for name in QUERY_OPTIONS if getattr(args, name) not in (None, [])]
    if args.status or args.cancel is not None:
        if given or args.no_wait or (args.status and args.cancel is not None):
            raise UsageError("--status and --cancel go alone (no query or bound options)")
        cfg = load_config(args.config)
        store = _open_store(cfg)
        try:
            return _status(store, args.json) if args.status else _cancel(store, args.cancel)
        finally:
            store.close()
    if args.json:
        raise UsageError("--json goes with --status")
    cfg = load_config(args.config)
    if cfg.backfill.source is None:
        raise _source_missing("")
    query = _query(args)
    settings: dict[str, Any] = {
        "source": cfg.backfill.source.describe(),
        "max_concurrent_moves": args.max_concurrent_moves,
        "studies_per_hour": args.studies_per_hour,
        "window": args.window,
    }
    store = _open_store(cfg)
    try:
        run_id = store.create_backfill_run(query, settings)
        print(
            f"backfill run {run_id} recorded: {_describe_query(query)}; the running `dicom-node serve` pulls it "
            f"from {cfg.backfill.source.describe()}"
        )
        if args.no_wait:
            print(f"follow it with: dicom-node backfill --status (cancel: dicom-node backfill --cancel {run_id})")
            return 0
        print("following it (Ctrl-C stops following, not the run)")
        try:
            progress = _follow(store, run_id)
        except KeyboardInterrupt:
            print(f"\nstopped following; serve keeps working on run {run_id} (dicom-node backfill --status)")
            return EXIT_INTERRUPTED
        _summary(progress)
        return 0 if progress.state == "done" and not progress.studies.get("failed") else 1
    finally:
        store.close()


def _query(args: argparse.Namespace) -> dict[str, Any]:
    accessions = list(args.accession or [])
    if args.accessions_file:
        accessions += read_accessions(Path(args.accessions_file))
    for a in accessions:
        if len(a) > 16 or "\\" in a:
            raise UsageError(f"--accession {a!r}: not an accession number (16 characters at most)")
    uids = list(args.study_uid or [])
    for u in uids:
        _check_uid(u, "--study-uid")
    if not (args.date_from or args.date_to or accessions or uids):
        raise UsageError("say what to pull: --from/--to YYYY-MM-DD, --accession / --accessions-file, or --study-uid")
    if args.date_from and args.date_to and args.date_from > args.date_to:
        raise UsageError(f"--from {args.date_from} is after --to {args.date_to}")
    if args.window is not None:
        try:
            parse_window(args.window)
        except ValueError as exc:
            raise UsageError(f"--window: {exc}") from None
    modalities = [m.strip().upper() for m in (args.modality or DEFAULT_MODALITIES)]
    if any(not m or len(m) > 16 or "\\" in m for m in modalities):
        raise UsageError("--modality: a modality code such as CR or DX")
    return {
        "from": args.date_from,
        "to": args.date_to,
        "modalities": sorted(set(modalities)),
        "accession_numbers": sorted(set(accessions)),
        "study_uids": sorted(set(uids)),
    }


def _describe_run(p: RunProgress) -> str:
    """A run's query, and whether it is a re-analysis fetch (its results delivered)."""
    return _describe_query(p.query) + ("; re-analysis: results delivered" if p.settings.get("deliver") else "")


def _describe_query(query: dict[str, Any]) -> str:
    """What a run asks for, without identifiers (lists are counted, not shown)."""
    parts = []
    if query.get("from") or query.get("to"):
        parts.append(f"study dates {query.get('from') or '...'} to {query.get('to') or '...'}")
    parts.append("/".join(query.get("modalities") or DEFAULT_MODALITIES))
    if query.get("accession_numbers"):
        parts.append(f"{len(query['accession_numbers'])} accession number(s)")
    if query.get("study_uids"):
        parts.append(f"{len(query['study_uids'])} Study UID(s)")
    return ", ".join(parts)


def _follow(store: Store, run_id: int) -> RunProgress:
    """Follow the run until it ends, with a progress bar on stderr; returns its last progress."""
    from tqdm import tqdm

    bar = tqdm(total=None, desc=f"run {run_id}: searching", unit="study", file=sys.stderr, dynamic_ncols=True)
    try:
        while True:
            progress = store.backfill_progress(run_id)[0]
            s = progress.studies
            if progress.state == "searching":
                bar.set_postfix_str(f"retrying: {progress.last_error}" if progress.last_error else "")
            else:
                total = sum(s.values())
                if bar.total != total:
                    bar.reset(total=total)
                    bar.set_description(f"run {run_id}: pulling")
                done = s["moved"] + s["failed"] + s["skipped"]
                bar.n = done
                bar.set_postfix_str(
                    f"moved {s['moved']}, moving {s['moving']}, failed {s['failed']}"
                    + (f", {progress.retrying} retrying" if progress.retrying else "")
                )
            bar.refresh()
            if progress.finished:
                return progress
            time.sleep(FOLLOW_POLL_S)
    finally:
        bar.close()


def _summary(p: RunProgress) -> None:
    s = p.studies
    print(
        f"backfill run {p.id} {p.state}: found {p.found} studies, already held {p.already_held}, "
        f"moved {s['moved']} ({p.moved_instances} images), failed {s['failed']}"
        + (f", skipped {s['skipped']}" if s["skipped"] else "")
    )
    if p.state == "failed" and p.last_error:
        print(f"  search failed: {p.last_error}")
    for reason, n in sorted(p.errors.items(), key=lambda kv: -kv[1]):
        print(f"  failed x{n}: {reason}")


def _iso(t: Any) -> str | None:
    return t.isoformat(timespec="seconds") + "Z" if t is not None else None


def _status(store: Store, as_json: bool) -> int:
    runs = store.backfill_progress()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": p.id,
                        "state": p.state,
                        "created_at": _iso(p.created_at),
                        "finished_at": _iso(p.finished_at),
                        "query": _describe_query(p.query),
                        "deliver": bool(p.settings.get("deliver")),
                        "settings": p.settings,
                        "found": p.found,
                        "already_held": p.already_held,
                        "studies": p.studies,
                        "moved_instances": p.moved_instances,
                        "search_attempts": p.attempts,
                        "last_error": p.last_error,
                        "next_attempt_at": _iso(p.next_attempt_at),
                        "retrying": p.retrying,
                        "failures": p.errors,
                    }
                    for p in runs
                ],
                indent=2,
            )
        )
        return 0
    if not runs:
        print("no backfill runs yet (dicom-node backfill --from YYYY-MM-DD --to YYYY-MM-DD)")
        return 0
    for p in runs:
        s = p.studies
        total = sum(s.values())
        print(f"run {p.id}  {p.state:9s} created {_iso(p.created_at)}  {_describe_run(p)}")
        if p.state == "searching":
            if p.last_error:
                print(f"  search: retrying (attempt {p.attempts + 1} at {_iso(p.next_attempt_at)}): {p.last_error}")
            else:
                print("  search: due now (is `dicom-node serve` running?)")
            continue
        print(
            f"  found {p.found}, already held {p.already_held}; pulled {s['moved']} of {total} "
            f"({p.moved_instances} images), moving {s['moving']}, pending {s['pending']}, failed {s['failed']}"
            + (f", skipped {s['skipped']}" if s["skipped"] else "")
            + (f"; {p.retrying} waiting for a retry" if p.retrying else "")
        )
        if p.state == "failed" and p.last_error:
            print(f"  search failed: {p.last_error}")
        for reason, n in sorted(p.errors.items(), key=lambda kv: -kv[1]):
            print(f"  failed x{n}: {reason}")
    return 0


def _cancel(store: Store, run_id: int) -> int:
    if not store.cancel_backfill_run(run_id):
        raise UsageError(f"no searching or moving backfill run {run_id} (dicom-node backfill --status lists them)")
    print(f"backfill run {run_id} cancelled: nothing more is pulled (a move under way finishes)")
    return 0


def add_command(command: Command) -> None:
    """Register ``backfill`` with the main parser's ``command(name, func, help)``."""
    sp = command(
        "backfill", cmd_backfill, "pull past studies from the PACS (backfill.source) to analyse, never deliver"
    )
    sp.add_argument("--from", dest="date_from", type=_date, metavar="YYYY-MM-DD", help="first study date (YYYY-MM-DD)")
    sp.add_argument("--to", dest="date_to", type=_date, metavar="YYYY-MM-DD", help="last study date (YYYY-MM-DD)")
    sp.add_argument(
        "--modality", action="append", metavar="CODE", help="modality in study (repeatable; default: CR and DX)"
    )
    sp.add_argument("--accession", action="append", metavar="NUMBER", help="only this accession number (repeatable)")
    sp.add_argument("--accessions-file", metavar="FILE", help="only these accession numbers (one a line, or CSV)")
    sp.add_argument("--study-uid", action="append", metavar="UID", help="only this Study Instance UID (repeatable)")
    sp.add_argument(
        "--max-concurrent-moves", type=_positive, metavar="N", help="this run's bound (default: backfill's)"
    )
    sp.add_argument(
        "--studies-per-hour", type=_count, metavar="N", help="this run's bound, 0 = unbounded (default: backfill's)"
    )
    sp.add_argument("--window", metavar="HH:MM-HH:MM", help="start moves only then, local time (e.g. 22:00-06:00)")
    sp.add_argument("--no-wait", action="store_true", help="record the run and return (serve works it)")
    sp.add_argument("--status", action="store_true", help="list the runs with their progress")
    sp.add_argument("--json", action="store_true", help="with --status: as JSON")
    sp.add_argument("--cancel", type=_positive, metavar="RUN_ID", help="stop a run")
