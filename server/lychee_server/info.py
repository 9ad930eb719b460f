"""``lychee-rerank info``: what a running server serves (``GetServerInfo``), from the base install.

Only the typed client is used (grpcio + protobuf): no torch, no pydantic, no server modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

PROG = "lychee-rerank info"


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="a running server: host:port or a gRPC target URI")
    parser.add_argument("--api-key", help="bearer token (or LYCHEE_API_KEY)")
    parser.add_argument("--tls-ca", type=Path, help="PEM root certificate: use TLS")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _plain(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def info_dict(info: Any) -> dict[str, Any]:
    """A ``ServerInfo`` as JSON-ready values (sets sorted, the limits nested)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(info):
        value = getattr(info, f.name)
        if dataclasses.is_dataclass(value):
            value = {g.name: _plain(getattr(value, g.name)) for g in dataclasses.fields(value)}
        out[f.name] = _plain(value)
    return out


def run_info(ns: argparse.Namespace) -> int:
    from lychee.rerank.client import LycheeClient, LycheeError

    try:
        root = ns.tls_ca.read_bytes() if ns.tls_ca else None
    except OSError as err:
        print(f"{PROG}: cannot read --tls-ca {str(ns.tls_ca)!r}: {err.strerror or err}", file=sys.stderr)
        return 1
    api_key = ns.api_key or os.environ.get("LYCHEE_API_KEY")
    try:
        with LycheeClient(ns.target, api_key=api_key, root_certificates=root, timeout=ns.timeout) as client:
            info = client.server_info()
    except (LycheeError, ValueError) as err:
        print(f"{PROG}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    data = info_dict(info)
    if ns.json:
        print(json.dumps(data, indent=2))
        return 0
    limits = data.pop("limits")
    for key, value in data.items():
        print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
    for key, value in limits.items():
        print(f"limits.{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    return 0
