"""The `axm1-llm` command: `serve`, `tokenizer-service`, `status` and `worker`.

Every settings field is a flag (`queue_size` is `--queue-size`). A flag overrides the environment,
which overrides the config file, which overrides the default; only flags actually given are
passed on, so the lower layers stay visible.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, get_args

import httpx
import pydantic
import uvicorn
from pydantic_settings import BaseSettings

from llm_service.children import DataDirInUse, claim_data_dir, end_leftovers, owner_tag
from llm_service.logging_setup import configure_logging
from llm_service.server import ConnectionLimits, default_max_connections, guarded_protocol
from llm_service.settings import DaemonSettings
from tokenizer_service.settings import MIN_SECRET_CHARS, TokenizerServiceSettings

DEFAULT_URL = "http://127.0.0.1:11535"


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    """One flag per field; its help names the environment variable and the default."""
    env_prefix = settings_cls.model_config.get("env_prefix", "")
    for name, field in settings_cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default)
        shown_default = "unset" if default in (None, "") else default
        choices = get_args(field.annotation) if name == "log_format" else None
        parser.add_argument(
            _flag(name),
            dest=name,
            default=argparse.SUPPRESS,  # absent flags must not hide env or file values
            choices=choices or None,
            metavar=name.upper() if not choices else None,
            help=f"{field.description} [env {env_prefix}{name.upper()}; default: {shown_default}]",
        )


def _describe_error(error: Any) -> str:
    if not error["loc"]:
        return error["msg"]
    name = str(error["loc"][0])
    if error["type"] == "extra_forbidden":  # only a config file can hold unknown names
        return f"unknown setting {name!r} in the config file"
    return f"{_flag(name)}: {error['msg']}"


def fail(parser: argparse.ArgumentParser, message: str) -> None:
    """A usage error without the (long) usage text: exit status 2."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def build_settings(
    parser: argparse.ArgumentParser, settings_cls: type[BaseSettings], args: argparse.Namespace
) -> Any:
    """Settings from the flags given (plus env, file, defaults); a bad value is a usage error."""
    given = {name: value for name, value in vars(args).items() if name in settings_cls.model_fields}
    try:
        return settings_cls(**given)
    except pydantic.ValidationError as exc:
        fail(parser, "; ".join(_describe_error(err) for err in exc.errors()))
    except ValueError as exc:  # the config file itself: missing, or of an unknown kind
        fail(parser, str(exc))


def _claim(parser: argparse.ArgumentParser, data_dir: Path) -> Any:
    """Own the data folder, then end what an instance killed earlier left running under it."""
    try:
        lock = claim_data_dir(data_dir)
    except (DataDirInUse, OSError) as exc:
        fail(parser, str(exc))
    end_leftovers(owner_tag(data_dir))
    return lock


def _uvicorn_server(app: Any, host: str, port: int, log_level: str, settings: DaemonSettings | None = None) -> uvicorn.Server:
    """A uvicorn server; with `settings`, bounded as the daemon's API is (connections, header and
    body times and sizes, keep-alive, shutdown)."""
    # log_config=None: uvicorn's loggers go through configure_logging's handler.
    options: dict[str, Any] = {}
    if settings is not None:
        limits = ConnectionLimits(
            max_connections=settings.max_connections or default_max_connections(),
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_headers=settings.max_headers,
            max_header_bytes=settings.max_header_bytes,
        )
        options.update(
            http=guarded_protocol(limits),
            timeout_keep_alive=settings.keep_alive_timeout_s,
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level, **options)
    return uvicorn.Server(config)


async def _serve_in_order(servers: list[uvicorn.Server]) -> None:
    """Start each server once the one before it listens; stop them in reverse order.

    The reverse order comes from uvicorn itself: each server saves the signal handlers it
    replaces and re-raises a caught signal into them when it has shut down, so SIGTERM stops
    the daemon first (which stops its runners) and then the tokenizer service.
    """
    tasks = []
    for server in servers:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task  # failed to start: uvicorn has logged why and raises SystemExit
                return
            await asyncio.sleep(0.05)
        tasks.append(task)
    await asyncio.gather(*tasks)


def run_event_loop(main: Awaitable[None]) -> None:
    """Run `main` on uvloop where it is installed (15-20 % less CPU per relayed chunk, see
    bench/README.md), else on asyncio's loop. uvicorn picks uvloop only when it runs the loop
    itself; here the CLI runs it, to start two servers in order."""
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


def _tokenizer_app(settings: TokenizerServiceSettings) -> Any:
    from tokenizer_service.service import create_app

    return create_app(settings)


def cmd_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    settings: DaemonSettings = build_settings(parser, DaemonSettings, args)
    if not settings.descriptor.is_file():
        fail(
            parser,
            f"model descriptor not found: {settings.descriptor} "
            "(give --descriptor or AXM1_DESCRIPTOR, or create the file)"
        )
    if settings.tokenizer_service_secret and len(settings.tokenizer_service_secret) < MIN_SECRET_CHARS:
        fail(parser, f"tokenizer_service_secret must have at least {MIN_SECRET_CHARS} characters")
    if settings.tokenizer_service_url is not None and not settings.tokenizer_service_secret:
        fail(
            parser,
            "tokenizer_service_url is set but tokenizer_service_secret is not: give the secret the "
            "tokenizer service was started with (AXM1_TOKENIZER_SERVICE_SECRET)",
        )
    configure_logging(settings.log_level, settings.log_format)
    from llm_service.app import create_app  # the app imports the engines; --help stays fast

    data_lock = _claim(parser, settings.data_dir)  # noqa: F841 (held for the process's life)

    servers = []
    if settings.tokenizer_service_url is None:
        # In-process: a secret only this process knows (unless one is given), shared by the
        # service and the daemon's client; and the service starts what the daemon's descriptor names.
        secret = settings.tokenizer_service_secret or secrets.token_urlsafe(32)
        settings = settings.model_copy(update={"tokenizer_service_secret": secret})
        tokenizer_settings = TokenizerServiceSettings(
            port=settings.tokenizer_service_port,
            log_level=settings.log_level,
            log_format=settings.log_format,
            data_dir=settings.data_dir,
            child_env=settings.child_env,
            descriptor=settings.descriptor,
            discover_models=settings.discover_models,
            host_kind=settings.host_kind,
            secret=secret,
        )
        servers.append(
            _uvicorn_server(
                _tokenizer_app(tokenizer_settings), "127.0.0.1", tokenizer_settings.port,
                settings.log_level,
            )
        )
    servers.append(
        _uvicorn_server(create_app(settings), settings.host, settings.port, settings.log_level, settings)
    )
    run_event_loop(_serve_in_order(servers))
    return 0


def cmd_tokenizer_service(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    settings: TokenizerServiceSettings = build_settings(parser, TokenizerServiceSettings, args)
    # Run on its own, it starts programs for whoever holds the secret, and only those the
    # descriptor names: both are required.
    if not settings.secret:
        fail(
            parser,
            "no secret: set AXM1_TOKENIZER_SERVICE_SECRET (the daemon's tokenizer_service_secret, "
            f"at least {MIN_SECRET_CHARS} characters); every request but /health must carry it",
        )
    if settings.descriptor is None:
        fail(
            parser,
            "no descriptor: set AXM1_TOKENIZER_SERVICE_DESCRIPTOR (or --descriptor) to the daemon's "
            "model descriptor; only the tokenizer servers it names are started",
        )
    if not settings.descriptor.is_file():
        fail(parser, f"model descriptor not found: {settings.descriptor}")
    configure_logging(settings.log_level, settings.log_format)
    data_lock = _claim(parser, settings.data_dir)  # noqa: F841 (held for the process's life)
    server = _uvicorn_server(_tokenizer_app(settings), settings.host, settings.port, settings.log_level)
    run_event_loop(_serve_in_order([server]))
    return 0


def _age(since_epoch: Any) -> str:
    """An epoch time as an age: "42s ago"."""
    if not isinstance(since_epoch, (int, float)) or isinstance(since_epoch, bool):
        return "-"
    seconds = max(0, int(time.time() - since_epoch))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _progress(progress: Any) -> str:
    """The load progress `{percent, step, total, message}` as "step/total", or "43%" where the
    backend prints only a percentage (a managed upstream)."""
    if not isinstance(progress, dict):
        return "-"
    if progress.get("total"):
        return f"{progress.get('step', '-')}/{progress['total']}"
    if isinstance(progress.get("percent"), (int, float)):
        return f"{progress['percent']:.0f}%"
    return "-"


def _context(context: Any) -> str:
    """`{used, remaining, size}` as "used/size"."""
    if isinstance(context, dict) and context.get("size"):
        used = context.get("used")
        return f"{'-' if used is None else used}/{context['size']}"
    return "-"


def _queue(queue: Any) -> str:
    return str(queue.get("length", "-")) if isinstance(queue, dict) else "-"


def _last_error(error: Any, width: int = 60) -> str:
    """`{reason, at, details, log_tail}` as its reason, shortened."""
    reason = error.get("reason") if isinstance(error, dict) else None
    if not reason:
        return "-"
    text = str(reason).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def status_table(status: dict[str, Any]) -> str:
    """The `/api/status` reply as a table for a person; keys a model lacks show as `-`."""
    header = ("MODEL", "STATE", "SINCE", "PROGRESS", "QUEUE", "CONTEXT", "RESTARTS", "LAST ERROR")
    rows = [header]
    for model in status.get("models") or []:
        rows.append(
            (
                str(model.get("name", "?")),
                str(model.get("state", "?")),
                _age(model.get("since_epoch")),
                _progress(model.get("progress")),
                _queue(model.get("queue")),
                _context(model.get("context")),
                str(model.get("restarts", "-")),
                _last_error(model.get("last_error")),
            )
        )
    if len(rows) == 1:
        return "no models configured"
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
        for row in rows
    ).rstrip()


def cmd_status(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    headers = _api_headers(args)
    url = args.url.rstrip("/") + "/api/status"
    if not args.watch:
        table, problem = _fetch_status_table(url, headers, args.timeout)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(table)
        return 0
    # --watch: the table again every interval, in place on a terminal; a daemon that goes away
    # is shown as such and watched for until it comes back (Ctrl-C ends it).
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            table, problem = _fetch_status_table(url, headers, args.timeout)
            stamp = time.strftime("%H:%M:%S")
            print(f"{clear}{url} at {stamp} (every {args.interval:g}s, Ctrl-C to stop)\n{problem or table}", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _fetch_status_table(url: str, headers: dict[str, str], timeout: float) -> tuple[str, str | None]:
    """The status table, or the problem that kept it from being read."""
    try:
        reply = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return "", f"axm1-llm status: cannot reach {url}: {exc}"
    if reply.status_code != 200:
        return "", f"axm1-llm status: {url} answered {reply.status_code}: {reply.text.strip()}"
    return status_table(reply.json()), None


def _api_headers(args: argparse.Namespace) -> dict[str, str]:
    keys = [k.strip() for k in os.environ.get("AXM1_API_KEYS", "").split(",") if k.strip()]
    api_key = args.api_key or (keys[0] if keys else None)
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def cmd_pull(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Ask the running daemon to fetch a published model folder; show its progress."""
    url = args.url.rstrip("/") + "/api/pull"
    last_status = None
    try:
        with httpx.stream("POST", url, json={"model": args.repo, "stream": True}, headers=_api_headers(args),
                          timeout=httpx.Timeout(args.timeout, read=None)) as reply:
            if reply.status_code != 200:
                print(f"axm1-llm pull: {url} answered {reply.status_code}: {reply.read().decode().strip()}", file=sys.stderr)
                return 1
            for raw in reply.iter_lines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                if "error" in line:
                    print(f"\naxm1-llm pull: {line['error']}", file=sys.stderr)
                    return 1
                status = line.get("status", "")
                if line.get("total"):
                    percent = 100 * line.get("completed", 0) / line["total"]
                    print(f"\r{status}  {percent:5.1f}% of {line['total'] / 1e6:.1f} MB", end="", flush=True)
                elif status != last_status:
                    print(("\n" if last_status and last_status.startswith("pulling ") else "") + status, flush=True)
                last_status = status
    except httpx.HTTPError as exc:
        print(f"axm1-llm pull: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_worker(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import workers  # here, not at the top: the workers import torch, which `serve` never does

    return workers.main(args.kind, args.worker_args)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="axm1-llm",
        description="LLM server for the Axera AX-M1 NPU card (Ollama and OpenAI APIs).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the daemon (and, unless tokenizer_service_url is set, the tokenizer service)",
        description="Run the daemon. Flags override AXM1_* environment variables, which "
        "override the config file (--config / AXM1_CONFIG, TOML or YAML), which overrides "
        "the defaults.",
    )
    add_settings_flags(serve, DaemonSettings)
    serve.set_defaults(handler=cmd_serve, command_parser=serve)

    tokenizer = commands.add_parser(
        "tokenizer-service",
        help="run the tokenizer service alone (for a separate container or unit)",
        description="Run the tokenizer service alone. Environment: AXM1_TOKENIZER_SERVICE_*. "
        "Needs a secret (AXM1_TOKENIZER_SERVICE_SECRET) and the daemon's descriptor.",
    )
    add_settings_flags(tokenizer, TokenizerServiceSettings)
    tokenizer.set_defaults(handler=cmd_tokenizer_service, command_parser=tokenizer)

    status = commands.add_parser("status", help="show each model's state from a running daemon")
    status.add_argument("--url", default=DEFAULT_URL, help="daemon address (default: %(default)s)")
    status.add_argument(
        "--api-key", help="Bearer key (default: the first of AXM1_API_KEYS, if set)"
    )
    status.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait (default: %(default)s)"
    )
    status.add_argument("--watch", action="store_true", help="show the table again every --interval seconds")
    status.add_argument(
        "--interval", type=float, default=2.0, help="seconds between refreshes with --watch (default: %(default)s)"
    )
    status.set_defaults(handler=cmd_status, command_parser=status)

    pull = commands.add_parser("pull", help="fetch a published model folder into the running daemon's model folder")
    pull.add_argument("repo", help="the hub repository, e.g. AXERA-TECH/Qwen3-1.7B")
    pull.add_argument("--url", default=DEFAULT_URL, help="daemon address (default: %(default)s)")
    pull.add_argument("--api-key", help="Bearer key (default: the first of AXM1_API_KEYS, if set)")
    pull.add_argument("--timeout", type=float, default=30.0, help="seconds to connect (default: %(default)s)")
    pull.set_defaults(handler=cmd_pull, command_parser=pull)

    worker = commands.add_parser(
        "worker",
        help="run one model behind an OpenAI-compatible server of its own (needs torch)",
        description="Run a worker: `transformers` (a causal LM with LoRA adapters, "
        "/v1/chat/completions) or `embeddings` (/v1/embeddings). "
        "`axm1-llm worker KIND --help` lists a kind's flags.",
    )
    worker.add_argument("kind", choices=("transformers", "embeddings"), help="the kind of worker")
    worker.add_argument("worker_args", nargs=argparse.REMAINDER, help="the worker's own flags")
    worker.set_defaults(handler=cmd_worker, command_parser=worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.handler(args.command_parser, args)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a clean shutdown
        return 130


if __name__ == "__main__":
    sys.exit(main())
