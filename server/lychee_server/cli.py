"""``lychee-rerank``: serve, rank, bench, check, eval, make-test-checkpoint.

``serve`` flags are generated from :class:`lychee_server.settings.Settings`, so every knob is
both a ``--flag`` and a ``LYCHEE_*`` environment variable, documented once (in the field's
description). A flag given on the command line wins over the environment; the resulting
frozen Settings object is the only configuration any part of the server sees.

The client-side commands (``rank --target``, ``info``) work from the base install (grpcio +
protobuf): nothing here imports pydantic, torch or the server modules at import time. A command
whose extra is not installed says so in one line (:data:`EXTRA_OF_MODULE`), with the install
command for the wheel, checkout or git URL this package was installed from.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types
import typing
from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lychee_server.settings import Settings

# Third-party modules -> the extra that installs them (a missing one ends a command in one line).
EXTRA_OF_MODULE = {
    **dict.fromkeys(
        (
            "torch",
            "torchvision",
            "transformers",
            "safetensors",
            "PIL",
            "simplejpeg",
            "pydantic",
            "pydantic_settings",
            "grpc_health",
            "grpc_reflection",
            "prometheus_client",
            "httpx",
            "fastapi",
            "starlette",
            "uvicorn",
            "httptools",
            "orjson",
            "tokenizers",
            "numpy",
        ),
        "server",
    ),
    "pytrec_eval": "eval",
    "rank_bm25": "eval",
}


def install_hint(extra: str) -> str:
    """The pip command that adds ``extra`` to this install: from the wheel, directory or git URL it
    came from (PEP 610 ``direct_url.json``), else by name."""
    spec = f"lychee-rerank[{extra}]"
    try:
        raw = metadata.distribution("lychee-rerank").read_text("direct_url.json")
        direct = json.loads(raw) if raw else None
    except (metadata.PackageNotFoundError, ValueError):
        direct = None
    if isinstance(direct, dict) and isinstance(direct.get("url"), str):
        url: str = direct["url"]
        vcs = direct.get("vcs_info")
        if isinstance(vcs, dict):
            ref = vcs.get("requested_revision") or vcs.get("commit_id")
            spec = f"lychee-rerank[{extra}] @ {vcs.get('vcs', 'git')}+{url}" + (f"@{ref}" if ref else "")
        elif url.startswith("file://"):
            spec = f"{url.removeprefix('file://')}[{extra}]"
        else:
            spec = f"lychee-rerank[{extra}] @ {url}"
    return f"pip install '{spec}'"


def missing_extra_line(command: str, module: str) -> str | None:
    """One line for a command whose extra is not installed (``module`` could not be imported)."""
    extra = EXTRA_OF_MODULE.get(module.split(".")[0])
    if extra is None:
        return None
    return (
        f"lychee-rerank {command}: needs the [{extra}] extra (no module named {module!r}); "
        f"install it with: {install_hint(extra)}"
    )


def _server_extra_missing() -> str | None:
    """The first server-extra module that is not installed, or None."""
    for name in ("pydantic", "pydantic_settings", "torch", "transformers"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


def _field_kind(annotation: Any) -> tuple[str, Any]:
    """Classify a Settings field annotation for argparse: (kind, payload)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _field_kind(args[0])
    if annotation is bool:
        return "bool", None
    if origin is typing.Literal:
        return "choice", list(typing.get_args(annotation))
    if origin is tuple:
        return "list", args[0] if args else str
    if annotation in (int, float):
        return "scalar", annotation
    return "scalar", str  # str, Path, SecretStr: pydantic converts


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per Settings field; defaults stay None so the environment can fill them."""
    from lychee_server.settings import Settings

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        if isinstance(default, tuple):
            default = "none" if not default else "(set)"
        help_text = f"{field.description or ''} [env LYCHEE_{name.upper()}; default {default}]"
        kind, payload = _field_kind(field.annotation)
        if kind == "bool":
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif kind == "choice":
            parser.add_argument(flag, dest=name, choices=payload, default=None, help=help_text)
        elif kind == "list":
            parser.add_argument(
                flag.rstrip("s"), dest=name, action="append", default=None, help=help_text + " (repeatable)"
            )
        elif payload is int and field.default is not None and _optional(field.annotation):
            # an optional listener port: a number, or 'off' (Settings turns 'off' into None)
            parser.add_argument(flag, dest=name, type=_port_or_off, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=payload, default=None, help=help_text)


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _port_or_off(value: str) -> int | str:
    if value.strip().lower() in ("off", "none"):
        return "off"
    return int(value)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    from pydantic import SecretStr

    from lychee_server.settings import Settings

    given: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(ns, name, None)
        if value is None:
            continue
        if name == "api_keys":
            value = tuple(SecretStr(v) for v in value)
        given[name] = value
    return Settings(**given)


def _quiet_transformers() -> None:
    """Keep transformers' load-time chatter (progress bars, config notices) off the terminal.

    Set before transformers is imported; an operator's own TRANSFORMERS_VERBOSITY wins.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _cmd_serve(ns: argparse.Namespace) -> int:
    _quiet_transformers()
    from lychee_server.app import run_server

    return run_server(settings_from_args(ns))


def _cmd_make_checkpoint(ns: argparse.Namespace) -> int:
    from lychee_server.engine.checkpoint import main_make_checkpoint

    argv = [ns.directory, "--seed", str(ns.seed)]
    if ns.tiktoken:
        argv += ["--tiktoken", ns.tiktoken]
    return main_make_checkpoint(argv)


def _cmd_bench(ns: argparse.Namespace) -> int:
    from lychee_server.bench import run_bench

    return int(run_bench(ns))


def _cmd_bench_doors(ns: argparse.Namespace) -> int:
    from lychee_server.bench_doors import run_bench_doors

    return run_bench_doors(ns)


def _cmd_check(ns: argparse.Namespace) -> int:
    _quiet_transformers()
    from lychee_server.check import run_check

    return run_check(ns)


def _cmd_rank(ns: argparse.Namespace) -> int:
    _quiet_transformers()
    from lychee_server.rank import run_rank

    return run_rank(ns)


def _cmd_eval(ns: argparse.Namespace) -> int:
    _quiet_transformers()
    from lychee_server.eval import run_eval

    return run_eval(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lychee-rerank",
        description="Serve and use the Lychee multimodal reranker over gRPC.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the lychee.rerank.v1 gRPC server. Every flag is also a LYCHEE_* variable.",
    )
    if (missing := _server_extra_missing()) is None:
        add_settings_arguments(serve)
        serve.set_defaults(func=_cmd_serve)
    else:  # the base install: main() says which extra serving needs, whatever the flags
        serve.set_defaults(func=_missing_extra_cmd("serve", missing))

    rank = sub.add_parser(
        "rank",
        help="rank files/folders/globs of images and text files against a query",
        description="Rank documents (image and text files) against a text and/or image query, "
        "through a running server (--target) or in-process (--model).",
    )
    try:
        from lychee_server.rank import add_rank_arguments
    except ImportError:  # pragma: no cover - rank needs the client package
        pass
    else:
        add_rank_arguments(rank)
    rank.set_defaults(func=_cmd_rank)

    bench = sub.add_parser("bench", help="run the benchmark workloads (not a test)")
    try:
        from lychee_server.bench import add_bench_arguments
    except ImportError:  # pragma: no cover - bench lands with the engine
        pass
    else:
        add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    doors = sub.add_parser(
        "bench-doors",
        help="benchmark the HTTP/JSON door against the gRPC door on one server (not a test)",
        description="Spawn (or target) one server and time the same requests through gRPC and HTTP, "
        "alternating call by call; print a Markdown table, write JSON with --json.",
    )
    from lychee_server.bench_doors import add_bench_doors_arguments

    add_bench_doors_arguments(doors)
    doors.set_defaults(func=_cmd_bench_doors)

    check = sub.add_parser(
        "check",
        help="compare the engine's scores with the naive reference recipe on a model",
        description="Score every query x document modality through the engine and through the naive "
        "one-pair reference loop; exit 1 if they differ by more than --tolerance.",
    )
    from lychee_server.check import add_check_arguments

    add_check_arguments(check)
    check.set_defaults(func=_cmd_check)

    ev = sub.add_parser(
        "eval",
        help="measure what reranking a first stage does on a BEIR-layout benchmark (nDCG, MRR, recall)",
        description="Rerank a first stage (a TREC run file, or BM25) on a BEIR-layout benchmark with images "
        "through a running server (--target) or in-process (--model); report metrics before and after.",
    )
    from lychee_server.eval import add_eval_arguments

    add_eval_arguments(ev)
    ev.set_defaults(func=_cmd_eval)

    info = sub.add_parser(
        "info",
        help="show what a running server serves (model, device, limits)",
        description="Print GetServerInfo of a running server: model, revision, dtype, device, "
        "modalities, limits, version. Needs only the base install.",
    )
    from lychee_server.info import add_info_arguments

    add_info_arguments(info)
    info.set_defaults(func=_cmd_info)

    mk = sub.add_parser(
        "make-test-checkpoint",
        help="write a tiny random-weight Qwen2.5-VL checkpoint (for tests; scores mean nothing)",
    )
    mk.add_argument("directory", help="output directory")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument(
        "--tiktoken",
        default=None,
        help="Qwen's BPE ranks (the dashscope wheel or its qwen.tiktoken): the real Qwen2 vocabulary "
        "instead of the small test tokenizer",
    )
    mk.set_defaults(func=_cmd_make_checkpoint)
    return parser


def _cmd_info(ns: argparse.Namespace) -> int:
    from lychee_server.info import run_info

    return run_info(ns)


def _missing_extra_cmd(command: str, module: str) -> Any:
    def run(ns: argparse.Namespace) -> int:
        print(missing_extra_line(command, module), file=sys.stderr)
        return 2

    return run


def _is_validation_error(err: BaseException) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(err, pydantic.ValidationError)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"] and (missing := _server_extra_missing()) is not None:
        return int(_missing_extra_cmd("serve", missing)(argparse.Namespace()))
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        return int(ns.func(ns))
    except ModuleNotFoundError as err:
        line = missing_extra_line(ns.command, err.name or "") if err.name else None
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if not _is_validation_error(err):
            raise
        print(f"lychee-rerank: invalid settings:\n{err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
