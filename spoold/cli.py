"""`spoold …`: argument parsing only; the work is done by the modules it calls."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spoold.config import Config, ConfigError, load_config, resolve_config_path

EXIT_USAGE = 2


def _load(args: argparse.Namespace) -> Config:
    cfg = load_config(resolve_config_path(args.config))
    if getattr(args, "spool", None):
        cfg.spool_dir = Path(args.spool)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from spoold.daemon import Daemon
    from spoold.engines import make_engine
    from spoold.logs import setup_logging

    cfg = _load(args)
    setup_logging(cfg.logging.format, cfg.logging.level)
    daemon = Daemon(cfg, lambda: make_engine(cfg.engine))
    daemon.install_signal_handlers()
    return daemon.run(drain=args.drain)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spoold", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument(
        "--config", help="config file (default: $SPOOLD_CONFIG or /etc/spoold/spoold.yaml)"
    )
    run.add_argument("--spool", help="spool directory (overrides spool_dir in the config)")
    run.add_argument(
        "--drain",
        action="store_true",
        help="process everything claimable in incoming/ and processing/, then exit 0",
    )
    run.set_defaults(func=cmd_run)

    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(f"spoold: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
