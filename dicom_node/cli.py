"""The ``dicom-node`` command line. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or configuration."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .config import Config, load_config
from .errors import ConfigError, DicomNodeError
from .logs import setup_logging

log = logging.getLogger("dicom_node")


def _config(args) -> Config:
    return load_config(args.config)


def cmd_check_config(args) -> int:
    cfg = _config(args)
    print(f"configuration OK: AE {cfg.node.ae_title} on {cfg.node.host}:{cfg.node.port}, "
          f"storage {cfg.storage.root}, {len(cfg.destinations)} destination(s)")
    return 0


def cmd_serve(args) -> int:
    from .app import Node
    cfg = _config(args)
    setup_logging(cfg.logging.level)
    Node(cfg).run_forever()
    return 0


def cmd_status(args) -> int:
    from .app import open_store
    cfg = _config(args)
    store = open_store(cfg)
    try:
        report = store.status()
    finally:
        store.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for section in ("instances", "studies", "jobs", "deliveries"):
        print(f"{section:11s} " + "  ".join(f"{k}={v}" for k, v in report[section].items()))
    for k, v in report["last_activity"].items():
        print(f"last {k.replace('_', ' ')}: {v or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description="Chest X-ray AI DICOM node")
    p.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", "-c", default=None, help="config file (default: ./config.yaml, else defaults)")
        sp.set_defaults(func=func)
        return sp

    command("serve", cmd_serve, "receive images, analyse studies, send results (runs until SIGTERM/SIGINT)")
    command("check-config", cmd_check_config, "validate the configuration file and exit")
    command("status", cmd_status, "counts of instances, studies, jobs and deliveries (no patient data)") \
        .add_argument("--json", action="store_true", help="print the documented JSON form")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    except DicomNodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
