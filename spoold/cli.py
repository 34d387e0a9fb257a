"""spoold: a filesystem spool daemon for batch LLM inference.

Drop OpenAI-Batch-format JSONL files into <spool>/incoming/ (scp, rsync, a shared drive,
or `spoold submit`); `spoold run` claims each one, runs it through the engine in chunks,
commits results with fsync, survives crashes without losing or repeating a result, and
files the job under done/ or failed/. `spool-status` shows how it is going."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from pathlib import Path

from spoold.config import Config, ConfigError, config_for, parse_config, resolve_config_path

EXIT_USAGE = 2


def _load(args: argparse.Namespace) -> Config:
    cfg = config_for(args.config, getattr(args, "spool", None))
    if getattr(args, "instance", None):
        cfg.instance = args.instance
        parse_config({"instance": args.instance}, "--instance")  # same rules as the key
    return cfg


_early_signal: list[int] = []  # a stop asked for before the daemon could hear it


def _remember_signal(signum: int, _frame: object) -> None:
    _early_signal.append(signum)  # no lock taken: safe inside any handler


def cmd_run(args: argparse.Namespace) -> int:
    # Until the daemon's own handling is installed (imports, the config, NVML: seconds
    # with vLLM) a stop is remembered, then handed to it: it stops at once, cleanly.
    signal.signal(signal.SIGTERM, _remember_signal)
    signal.signal(signal.SIGINT, _remember_signal)
    from spoold.daemon import Daemon
    from spoold.engines import make_engine
    from spoold.logs import setup_logging

    cfg = _load(args)
    if cfg.engine.backend == "ray":
        from spoold.engines.rayengine import check_ray_config

        check_ray_config(cfg.engine)
    if cfg.engine.backend == "vllm":
        from spoold.engines.vllm import check_engine_args

        check_engine_args(cfg.engine)
    setup_logging(cfg.logging.format, cfg.logging.level)
    from spoold.gpu import open_nvml

    daemon = Daemon(cfg, lambda m, r: make_engine(cfg.engine, m, r), gpu_reader=open_nvml())
    daemon.install_signal_handlers()
    if _early_signal:
        daemon.request_stop(signal.Signals(_early_signal[0]).name)
    # What the imports made lives as long as the process: out of the cyclic collector's
    # sight, full collections stop walking it (~3% of a fake-engine job's CPU time).
    gc.freeze()
    from spoold.lease import InstanceTaken

    try:
        return daemon.run(drain=args.drain)
    except InstanceTaken as e:  # SPEC §3: one live daemon per instance name
        print(f"spoold: {e}", file=sys.stderr)
        return EXIT_USAGE


def _load_optional(args: argparse.Namespace) -> Config:
    """The config if one is named or installed; defaults otherwise (for offline checks)."""
    path = resolve_config_path(args.config)
    if args.config or os.environ.get("SPOOLD_CONFIG") or path.exists():
        return _load(args)
    return Config()


def cmd_submit(args: argparse.Namespace) -> int:
    from spoold.spool import Spool
    from spoold.submit import SubmitError, submit_file

    cfg = _load(args)
    spool = Spool(cfg.spool_dir, cfg.instance)
    code = 0
    for name in args.files:
        try:
            print(submit_file(spool, Path(name)))  # SPEC: the names, in incoming/
        except (SubmitError, OSError) as e:
            print(f"spoold submit: {e}", file=sys.stderr)
            code = 1
    return code


def cmd_cancel(args: argparse.Namespace) -> int:
    from spoold.spool import Spool
    from spoold.submit import SubmitError, find_job

    cfg = _load(args)
    spool = Spool(cfg.spool_dir, cfg.instance)
    try:
        job_dir = find_job(spool, args.job_id)
    except SubmitError as e:
        print(f"spoold cancel: {e}", file=sys.stderr)
        return 1
    if job_dir.parent != spool.processing:
        from spoold.layout import in_transit_note

        where = in_transit_note(job_dir) or f"it is in {job_dir.parent.name}/"
        print(f"spoold cancel: job {args.job_id} has already finished: {where}", file=sys.stderr)
        return 1
    try:
        spool.request_cancel(job_dir)
    except FileNotFoundError:
        print(f"spoold cancel: job {args.job_id} finished meanwhile", file=sys.stderr)
        return 1
    print(f"cancel requested for {args.job_id}: it stops at its next chunk boundary")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from spoold.spool import Spool
    from spoold.submit import SubmitError, retry_job

    cfg = _load(args)
    spool = Spool(cfg.spool_dir, cfg.instance)
    try:
        print(retry_job(spool, args.job_id, cfg.limits.max_line_bytes))
    except (SubmitError, OSError) as e:
        print(f"spoold retry: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from spoold.lint import Tally, counted, line_problems
    from spoold.validate import NotUtf8Error

    cfg = _load_optional(args)
    limits = cfg.limits
    path = Path(args.file)
    problems = 0

    def problem(message: str) -> None:
        nonlocal problems
        problems += 1
        print(f"{path}: {message}")

    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, errors reported as problems
    except OSError as e:
        problem(f"cannot read: {e.strerror}")
        return 1
    tally = Tally()
    with f:
        size = os.fstat(f.fileno()).st_size
        if not path.name.endswith(".jsonl"):
            problem("the name must end in .jsonl to be picked up as a job")
        if size > limits.max_file_bytes:
            problem(f"{size} bytes, over limits.max_file_bytes ({limits.max_file_bytes})")
        try:
            # A rough line count (~100 bytes a line) decides whether ids spill to disk;
            # the job's model is its first valid request's, as the daemon picks it.
            lines = line_problems(
                f, limits.max_line_bytes, cfg.engine.resolve_model, tally, size // 100
            )
            for line, text in lines:
                problem(f"line {line}: {text}")
        except NotUtf8Error as e:
            problem(f"{e}: the whole file would fail; save it as UTF-8")
            return 1
    total, valid = tally.requests, tally.requests - tally.invalid
    if total > limits.max_requests_per_job:
        problem(
            f"{counted(total, 'request')}, over limits.max_requests_per_job "
            f"({limits.max_requests_per_job})"
        )
    if total == 0:
        problem("no request lines (the file is empty or blank): the whole file would fail")
    elif valid == 0:
        problem("no valid request: the whole file would fail")
    print(
        f"{path}: {counted(total, 'request')}, {valid} valid, {tally.invalid} invalid "
        f"({counted(problems, 'problem')})"
    )
    return 1 if problems else 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from spoold.jobs import show_jobs

    return show_jobs(config_for(args.config, args.spool).spool_dir, args.state, args.json)


def cmd_serve(args: argparse.Namespace) -> int:
    from spoold.logs import setup_logging

    cfg = _load(args)
    if args.host:
        cfg.api.host = args.host
    if args.port is not None:
        parse_config({"api": {"port": args.port}}, "--port")  # same rules as the key
        cfg.api.port = args.port
    try:
        from spoold.serve import serve
    except ImportError as e:
        print(
            f"spoold serve: the HTTP API needs the api extra ({e.name} is not installed): "
            "pip install 'spoold[api]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    setup_logging(cfg.logging.format, cfg.logging.level)
    return serve(cfg)


CONFIG_HELP = (
    "config file (default: $SPOOLD_CONFIG, else /etc/spoold/spoold.yaml; with --spool and "
    "no config file, the defaults apply)"
)
SPOOL_HELP = "the spool directory (overrides spool_dir in the config)"


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, **kw: str
) -> argparse.ArgumentParser:
    """A subcommand with the options every command that touches a spool takes."""
    parser = sub.add_parser(name, help=summary, description=kw.get("description", summary))
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    parser.add_argument("--spool", metavar="DIR", help=SPOOL_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spoold",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`spoold COMMAND --help` for a command's options.\nExit codes: 0 success; "
        "1 the command failed (the message says why); 2 a usage or config error, or\n"
        "(run) another live daemon holds this instance name.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(
        sub,
        "run",
        "run the daemon in the foreground (systemd runs this)",
        description="Run the daemon in the foreground: claim files from incoming/, run "
        "them, file them under done/ or failed/. Stops cleanly on SIGTERM or SIGINT.",
    )
    run.add_argument("--instance", help="this daemon's name (overrides instance in the config)")
    run.add_argument(
        "--drain",
        action="store_true",
        help="process everything claimable in incoming/ and processing/, then exit "
        "(0 when every job was filed)",
    )
    run.set_defaults(func=cmd_run)

    submit = _command(
        sub,
        "submit",
        "copy files into incoming/ safely and print the names they got",
        description="Copy each FILE into incoming/ under a temporary name, fsync it, then "
        "give it its name without replacing a file there (a second batch.jsonl becomes "
        "batch-1.jsonl). Prints the names given in incoming/, one per line.",
    )
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.set_defaults(func=cmd_submit)

    cancel = _command(
        sub,
        "cancel",
        "cancel a queued or running job",
        description="Cancel a queued or running job: it stops at its next chunk boundary "
        "and goes to failed/ as cancelled, its committed results kept (`spoold retry` "
        "resumes it).",
    )
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.set_defaults(func=cmd_cancel)

    retry = _command(
        sub,
        "retry",
        "requeue a cancelled or failed job, or resubmit a finished job's failed requests",
        description="A job in failed/ that was cancelled or failed whole goes back in the "
        "queue under the same id and resumes from its checkpoint. For a job in done/, a "
        "new file in incoming/ gets its requests that failed in the engine.",
    )
    retry.add_argument("job_id", metavar="JOB_ID")
    retry.set_defaults(func=cmd_retry)

    validate = sub.add_parser(
        "validate",
        help="check a file as admission would; submit nothing",
        description="Check FILE as admission would and print every problem, line by line; "
        "exit 0 when clean, 1 when anything would be rejected or dead-lettered.",
    )
    validate.add_argument("file", metavar="FILE")
    validate.add_argument(
        "--config",
        metavar="PATH",
        help="config file whose limits and model aliases apply (default: $SPOOLD_CONFIG, "
        "else /etc/spoold/spoold.yaml if present, else the defaults)",
    )
    validate.set_defaults(func=cmd_validate)

    from spoold.jobs import STATES

    jobs = _command(
        sub,
        "jobs",
        "list jobs, newest first",
        description="List every job, newest first: id, state, requests completed / failed / "
        "total, model, source file name, age. A file waiting in incoming/ is listed by its "
        "name. Exit 0; 1 if a spool directory cannot be listed.",
    )
    jobs.add_argument("--state", choices=STATES, help="only the jobs in this state")
    jobs.add_argument("--json", action="store_true", help="one JSON object per line")
    jobs.set_defaults(func=cmd_jobs)

    serve = _command(
        sub,
        "serve",
        "the OpenAI-compatible Files and Batches API over the spool",
        description="Serve OpenAI's Files and Batches API over the spool (point the openai "
        "client's base_url at http://HOST:PORT/v1), with /v1/models and /health. Keys: "
        "api.keys_file (TOKEN [OWNER] a line); without one it listens on loopback only. "
        "Needs the api extra (pip install 'spoold[api]').",
    )
    serve.add_argument("--host", help="address to listen on (overrides api.host)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides api.port)")
    serve.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(f"spoold: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `spoold jobs | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
