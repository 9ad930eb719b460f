"""The Python half of ``scripts/gpu_check.sh``: the steps of the one prepared GPU check that are not
plain ``lychee-rerank`` commands, each a sub-command run in its own process by the script.

  wheels        install carried wheels (offline, into a temporary --target) for the runtime modules
                the GPU image lacks (pydantic, pydantic-settings, simplejpeg, ...)
  fetch-wheels  download those wheels here, for a machine with no registry (run on a networked host)
  preflight     versions, GPU, varlen attention / flash-attn / torch.compile / float8 probes, and
                whether the engine imports at all -> preflight.json
  variants      ``check`` once per engine settings variant, in one process -> variants.json
  profile       one request of workloads (a) and (b) under CUDA sync-debug mode (warnings to
                syncdebug.txt) and under the torch profiler (top kernels to profile.txt)
  summary       the closing table: step, status, seconds, key figure

Nothing outside the standard library is imported at module level: on a bare machine a missing
package must turn into a line in a report, never into a traceback that stops the check.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lychee_server.machine import cpu_model

__all__ = ["RUNTIME_WHEELS", "main"]

# Runtime modules the engine path (settings, images) needs beyond torch + transformers and their own
# dependencies, by distribution name (as pip names wheel files) -> import name. A GPU image with only
# torch + transformers has none of the first seven; typing_extensions is there but may be too old.
RUNTIME_WHEELS: dict[str, str] = {
    "pydantic": "pydantic",
    "pydantic_core": "pydantic_core",
    "pydantic_settings": "pydantic_settings",
    "annotated_types": "annotated_types",
    "typing_inspection": "typing_inspection",
    "python_dotenv": "dotenv",
    "simplejpeg": "simplejpeg",
    "typing_extensions": "typing_extensions",
}
_WHEEL_HINT = (
    "carry the wheels: on a machine with a registry run `python -m lychee_server.gpu_check "
    "fetch-wheels .whl` in the repo root, then pass .whl in the device run's carry "
    "(scripts/gpu_check.sh installs them offline into a temporary directory)"
)

# Variants of the engine settings compared by ``variants`` (each against the naive recipe).
VARIANTS: tuple[tuple[str, str], ...] = (
    ("attention-backend", "sdpa"),
    ("attention-backend", "varlen"),
    ("fused-kernels", "on"),
    ("fused-kernels", "off"),
    ("quantization", "fp8"),
)
# Not run on a CPU: fp8 needs a Hopper GPU, and fused kernels on a CPU mean inductor compiling C++.
_GPU_ONLY_VARIANTS = {("quantization", "fp8"), ("fused-kernels", "on")}


def _write_json(path: Path | None, data: Any) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:600]


# ------------------------------------------------------------------------------------------ wheels
def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def _wheels(ns: argparse.Namespace) -> int:
    """Install the carried wheels whose module is missing here (typing_extensions: when older)."""
    missing = [mod for dist, mod in RUNTIME_WHEELS.items() if dist != "typing_extensions" and _absent(mod)]
    report: dict[str, Any] = {"dir": str(ns.dir), "missing_before": missing, "installed": [], "error": None}
    rc = 0
    wheel_dir = Path(ns.dir)
    files = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    chosen: list[Path] = []
    for f in files:
        dist = f.name.split("-")[0].lower()
        mod = RUNTIME_WHEELS.get(dist)
        if mod is None:
            continue
        if dist == "typing_extensions":
            have = _installed_version(dist)
            want = f.name.split("-")[1]
            if have is not None and _version_tuple(have) >= _version_tuple(want):
                continue
        elif not _absent(mod):
            continue
        chosen.append(f)
    if missing and not files:
        report["error"] = f"missing {', '.join(missing)} and no wheels in {wheel_dir}: {_WHEEL_HINT}"
        rc = 2
    elif chosen:
        cmd = [
            sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--upgrade", "--target", str(ns.target), *map(str, chosen),
        ]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            report["error"] = f"pip could not run: {_err(exc)}"
            rc = 2
        else:
            if done.returncode != 0:
                report["error"] = f"pip install failed: {(done.stderr or done.stdout).strip()[-800:]}"
                rc = 2
            else:
                report["installed"] = [f.name for f in chosen]
    if rc == 0 and missing:
        sys.path.insert(0, str(ns.target))
        importlib.invalidate_caches()
        still = [m for m in missing if _absent(m)]
        if still:
            report["error"] = (
                f"still missing after the wheels in {wheel_dir}: {', '.join(still)}; {_WHEEL_HINT}"
            )
            rc = 2
    report["missing_after"] = [m for m in missing if _absent(m)] if rc == 0 else missing
    _write_json(ns.json, report)
    print(json.dumps(report, indent=2))
    if report["error"]:
        print(f"[wheels] {report['error']}", file=sys.stderr)
    return rc


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _fetch_wheels(ns: argparse.Namespace) -> int:
    """pip download of :data:`RUNTIME_WHEELS` (this machine's versions) for the GPU image's Python."""
    dest = Path(ns.dir)
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 27, 28, 31, 34, 35, 39)]
    platforms += ["manylinux2014_x86_64", "manylinux1_x86_64"]
    rc = 0
    for dist in RUNTIME_WHEELS:
        version = _installed_version(dist)
        spec = f"{dist.replace('_', '-')}=={version}" if version else dist.replace("_", "-")
        cmd = [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--python-version", ns.python_version, "--implementation", "cp", "-d", str(dest),
        ]  # fmt: skip
        for plat in platforms:
            cmd += ["--platform", plat]
        done = subprocess.run([*cmd, spec], check=False)
        print(f"[fetch-wheels] {spec}: {'ok' if done.returncode == 0 else 'FAILED'}", file=sys.stderr)
        rc = rc or done.returncode
    print("\n".join(sorted(p.name for p in dest.glob("*.whl"))))
    return rc


# --------------------------------------------------------------------------------------- preflight
_VERSION_MODULES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "numpy",
    "PIL",
    "torchvision",
    "triton",
    "flash_attn",
    "pydantic",
    "pydantic_settings",
    "simplejpeg",
    "grpc",
)


def _module_info(name: str) -> dict[str, Any]:
    if _absent(name):
        return {"present": False}
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # present but broken (a CUDA extension built for another torch, say)
        return {"present": True, "importable": False, "error": _err(exc)}
    return {"present": True, "importable": True, "version": str(getattr(mod, "__version__", "?"))}


def _driver_version() -> str | None:
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    with contextlib.suppress(Exception):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    return None


def _probe(fn: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        out = dict(fn())
    except Exception as exc:
        out = {"ok": False, "error": _err(exc)}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _probe_varlen(torch: Any, device: Any) -> dict[str, Any]:
    import inspect

    from torch.nn.attention import varlen

    params = sorted(inspect.signature(varlen.varlen_attn).parameters)
    if device.type != "cuda":
        return {"ok": None, "note": "importable; kernel call not probed on cpu", "params": params}
    lengths, heads, dim = [5, 17, 3], 4, 64
    total = sum(lengths)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(total, heads, dim, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, *(sum(lengths[: i + 1]) for i in range(len(lengths)))], dtype=torch.int32)
    cu = cu.to(device)
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    out = varlen.varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    refs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        refs.append(
            torch.nn.functional.scaled_dot_product_attention(
                *(t[sl].transpose(0, 1).float() for t in (q, k, v)), is_causal=True
            ).transpose(0, 1)
        )
        start += n
    ref = torch.cat(refs)
    err = float((out.float() - ref).norm() / ref.norm())
    return {"ok": bool(err < 3e-2), "relative_error": err, "params": params, "causal_via": sorted(kwargs)}


def _probe_compile(torch: Any, device: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"triton": _module_info("triton")}
    if device.type != "cuda":
        info.update(ok=None, note="torch.compile not probed on cpu")
        return info

    def f(x: Any) -> Any:
        return torch.nn.functional.silu(x) * x + 1.0

    x = torch.randn(4096, device=device)
    compiled = torch.compile(f, dynamic=False)
    t0 = time.perf_counter()
    y = compiled(x)
    torch.cuda.synchronize(device)
    err = float((y - f(x)).abs().max())
    info.update(ok=bool(err < 1e-4), max_abs_error=err, first_call_s=round(time.perf_counter() - t0, 3))
    return info


def _probe_fp8(torch: Any, device: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "float8_e4m3fn": hasattr(torch, "float8_e4m3fn"),
        "_scaled_mm": hasattr(torch, "_scaled_mm"),
    }
    if device.type != "cuda":
        info.update(ok=None, note="_scaled_mm not probed on cpu")
        return info
    gen = torch.Generator(device="cpu").manual_seed(1)
    a32 = torch.randn(32, 64, generator=gen)
    b32 = torch.randn(48, 64, generator=gen)
    a = a32.to(device, torch.float8_e4m3fn)
    b = b32.to(device, torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants its second operand
    ref = a.float() @ b.float()
    for kind, sa, sb in (
        ("tensorwise", torch.ones((), device=device), torch.ones((), device=device)),
        ("rowwise", torch.ones(32, 1, device=device), torch.ones(1, 48, device=device)),
    ):
        try:
            out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            if isinstance(out, tuple):
                out = out[0]
            err = float((out.float() - ref).norm() / ref.norm())
            info[kind] = {"ok": bool(err < 2e-2), "relative_error": err}
        except Exception as exc:
            info[kind] = {"ok": False, "error": _err(exc)}
    info["ok"] = bool(info["tensorwise"]["ok"] or info["rowwise"]["ok"])
    return info


def _preflight(ns: argparse.Namespace) -> int:
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "device_requested": ns.device,
        "modules": {},
        "problems": [],
    }
    problems: list[str] = report["problems"]
    rc = 0
    try:
        for name in _VERSION_MODULES:
            report["modules"][name] = _module_info(name)
        torch_info = report["modules"]["torch"]
        if not torch_info.get("importable"):
            problems.append(f"torch cannot be imported: {torch_info.get('error', 'not installed')}")
            return 1
        import torch

        report["torch_cuda"] = torch.version.cuda
        cudnn: Any = torch.backends.cudnn
        report["cudnn"] = cudnn.version() if cudnn.is_available() else None
        report["cuda_available"] = torch.cuda.is_available()
        want_cuda = ns.device.startswith("cuda")
        if want_cuda and not torch.cuda.is_available():
            problems.append("--device cuda but torch sees no CUDA device")
            rc = 1
        device = torch.device(ns.device if (want_cuda and torch.cuda.is_available()) else "cpu")
        report["device"] = str(device)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            free, total = torch.cuda.mem_get_info(device)
            report["gpu"] = {
                "name": torch.cuda.get_device_name(device),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                "memory_gib": round(total / 2**30, 1),
                "free_gib": round(free / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
                "device_count": torch.cuda.device_count(),
                "driver": _driver_version(),
            }
            with contextlib.suppress(Exception):
                from lychee_server.bench import detect_peak_flops

                flops, fragment = detect_peak_flops(report["gpu"]["name"])
                report["gpu"]["peak_bf16_flops"] = flops
                report["gpu"]["peak_table_entry"] = fragment or None
        report["varlen_attn"] = _probe(lambda: _probe_varlen(torch, device))
        report["flash_attn"] = report["modules"]["flash_attn"]
        report["torch_compile"] = _probe(lambda: _probe_compile(torch, device))
        report["float8"] = _probe(lambda: _probe_fp8(torch, device))
        # The engine itself: what bench / check / profile import.
        engine: dict[str, Any] = {}
        for mod in ("lychee_server.settings", "lychee_server.engine.qwen", "lychee_server.check"):
            try:
                importlib.import_module(mod)
                engine[mod] = "ok"
            except Exception as exc:
                engine[mod] = _err(exc)
                missing = getattr(exc, "name", None)
                if isinstance(exc, ModuleNotFoundError) and missing:
                    need = (
                        " (lychee_server.settings is pydantic-settings: it needs pydantic + "
                        "pydantic-settings)"
                        if missing.split(".")[0] in ("pydantic", "pydantic_settings", "pydantic_core")
                        else ""
                    )
                    problems.append(
                        f"{mod} cannot be imported: no module named {missing!r}{need}; bench, check and "
                        f"profile will fail; {_WHEEL_HINT}"
                    )
                else:
                    problems.append(f"{mod} cannot be imported: {_err(exc)}")
                rc = 1
                break
        report["engine_import"] = engine
        if not report["modules"]["simplejpeg"]["present"]:
            problems.append(
                "simplejpeg is missing: the engine's JPEG checks (engine/images.py) fail on every JPEG "
                f"(bench workloads a, c, d); {_WHEEL_HINT}"
            )
            rc = 1
    except Exception as exc:
        problems.append(f"preflight itself failed: {_err(exc)}")
        report["traceback"] = traceback.format_exc()
        rc = 1
    finally:
        report["ok"] = rc == 0
        _write_json(ns.json, report)
        print(json.dumps(report, indent=2, default=str))
        for line in problems:
            print(f"[preflight] PROBLEM: {line}", file=sys.stderr)
    return rc


# ---------------------------------------------------------------------------------------- variants
def _model_argv(ns: argparse.Namespace) -> list[str]:
    argv = ["--device", ns.device]
    if ns.model:
        argv += ["--model", ns.model]
    if ns.random_weights:
        argv.append("--random-weights")
    if ns.shape:
        argv += ["--shape", ns.shape]
    if getattr(ns, "dtype", None):
        argv += ["--dtype", ns.dtype]
    return argv


def _free_device_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _variants(ns: argparse.Namespace) -> int:
    from lychee_server.check import add_check_arguments, run_check

    cpu = not ns.device.startswith("cuda")
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {"base": _model_argv(ns), "variants": results}
    rc = 0
    for flag, value in VARIANTS:
        name = f"{flag}={value}"
        row: dict[str, Any] = {"variant": name}
        results.append(row)
        if cpu and (flag, value) in _GPU_ONLY_VARIANTS:
            row.update(status="skipped", note="GPU-only variant in a CPU run")
            _write_json(ns.json, report)
            continue
        parser = argparse.ArgumentParser(prog="check")
        add_check_arguments(parser)
        with tempfile.TemporaryDirectory(prefix="lychee-variant-") as tmp:
            out = Path(tmp) / "check.json"
            args = parser.parse_args([*_model_argv(ns), f"--{flag}", value, "--json", str(out)])
            print(f"[variants] {name}", file=sys.stderr)
            t0 = time.perf_counter()
            try:
                code = int(run_check(args))
                data = json.loads(out.read_text()) if out.is_file() else {}
                row.update(
                    status="ok" if code == 0 else "mismatch",
                    rc=code,
                    pairs=data.get("pairs"),
                    max_abs_diff_p=data.get("max_abs_diff_p"),
                    max_abs_diff_logit=data.get("max_abs_diff_logit"),
                    tolerance=data.get("tolerance"),
                    engine_seconds=data.get("engine_seconds"),
                    naive_seconds=data.get("naive_seconds"),
                    dtype=data.get("dtype"),
                )
            except (Exception, SystemExit) as exc:
                row.update(status="error", error=_err(exc), traceback=traceback.format_exc()[-3000:])
                del exc
            row["seconds"] = round(time.perf_counter() - t0, 2)
        if row["status"] != "ok":
            rc = 1
        print(f"[variants] {name}: {row['status']} {row.get('max_abs_diff_p', row.get('error', ''))}")
        _free_device_memory()
        _write_json(ns.json, report)
    _write_json(ns.json, report)
    return rc


# ----------------------------------------------------------------------------------------- profile
def _profile(ns: argparse.Namespace) -> int:
    import torch

    from lychee_server.bench import _jpeg, _passages, _run_engine_once, add_bench_arguments, open_engine
    from lychee_server.domain import DEFAULT_INSTRUCTION, Content, ImageInput, MediaType

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    parser = argparse.ArgumentParser(prog="bench")
    add_bench_arguments(parser)
    args = parser.parse_args(_model_argv(ns))
    engine, tmp = open_engine(args, args.batch_token_budget, args.max_batch_pairs)
    dev = engine.device
    cuda = dev.type == "cuda"
    n_a = ns.docs_a if ns.docs_a else (50 if cuda else 4)
    n_b = ns.docs_b if ns.docs_b else (100 if cuda else 8)
    w, h = (int(x) for x in (ns.image_size or ("1920x1080" if cuda else "320x240")).split("x"))
    tokens = ns.passage_tokens if ns.passage_tokens else (256 if cuda else 64)
    workloads: dict[str, tuple[Any, list[Any]]] = {
        "a": (
            Content(text="Find a picture of a city skyline at sunset near a river"),
            [Content(image=ImageInput(_jpeg(i, w, h), MediaType.JPEG)) for i in range(n_a)],
        ),
        "b": (
            Content(text="what is the capital of France"),
            [Content(text=t) for t in _passages(engine, n_b, tokens)],
        ),
    }
    report: dict[str, Any] = {
        "device": str(dev),
        "docs": {"a": n_a, "b": n_b},
        "image_size": f"{w}x{h}",
        "passage_tokens": tokens,
        "workloads": {},
    }
    pool = ThreadPoolExecutor(max(1, engine.settings.decode_threads))

    def once(name: str) -> float:
        query, docs = workloads[name]
        engine.vision_cache.clear()  # every request runs the vision tower, as a fresh one does
        dt, _, _ = _run_engine_once(engine, pool, DEFAULT_INSTRUCTION, query, docs)
        return dt

    sync_lines: list[str] = []
    prof_lines: list[str] = []
    try:
        report["preemption"] = _probe(lambda: _preemption(engine, pool, workloads))
        for name in workloads:
            row: dict[str, Any] = {"warm_s": round(once(name), 4)}  # untimed warm request
            report["workloads"][name] = row
            # 1. CUDA sync-debug mode: every synchronising call the request makes becomes a warning.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    row["syncdebug_s"] = round(once(name), 4)
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode(0)
            sync = [
                wm
                for wm in caught
                if "synchroniz" in str(wm.message).lower() or "sync_debug" in str(wm.message).lower()
            ]
            row["sync_warnings"] = len(sync) if cuda else None
            row["other_warnings"] = len(caught) - len(sync)
            sites = Counter(
                (f"{wm.filename}:{wm.lineno}", str(wm.message).splitlines()[0][:160]) for wm in sync
            )
            sync_lines.append(
                f"== workload ({name}): one request under torch.cuda.set_sync_debug_mode('warn')"
            )
            if not cuda:
                sync_lines.append("n/a: sync-debug mode is CUDA only (this run is on the CPU)")
            else:
                sync_lines.append(f"{len(sync)} synchronising calls at {len(sites)} sites")
                for (site, msg), count in sites.most_common():
                    sync_lines.append(f"{count:6d}  {site}  {msg}")
            others = Counter(str(wm.message).splitlines()[0][:200] for wm in caught if wm not in sync)
            if others:
                sync_lines.append("other warnings in the same request:")
                sync_lines += [f"{c:6d}  {m}" for m, c in others.most_common(10)]
            sync_lines.append("")
            # 2. the profiler: top kernels by self time, one request.
            activities = [torch.profiler.ProfilerActivity.CPU]
            if cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.reset_peak_memory_stats(dev)
            with torch.profiler.profile(activities=activities) as prof:
                row["profiled_s"] = round(once(name), 4)
            if cuda:
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
            averages = prof.key_averages()
            table = None
            keys = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
            for key in keys:
                try:
                    table = averages.table(sort_by=key, row_limit=25)
                    break
                except Exception as exc:
                    table = f"(profiler table by {key} failed: {_err(exc)})"
            prof_lines += [
                f"== workload ({name}): top 25 by {'CUDA' if cuda else 'CPU'} self time, one request "
                f"({row['profiled_s']:.3f} s under the profiler)",
                str(table),
                "",
            ]

            def self_time(evt: Any) -> float:
                if not cuda:
                    return float(getattr(evt, "self_cpu_time_total", 0.0))
                for attr in ("self_device_time_total", "self_cuda_time_total"):
                    if hasattr(evt, attr):
                        return float(getattr(evt, attr))
                return 0.0

            top = sorted(averages, key=self_time, reverse=True)[:5]
            row["top"] = [
                {"name": e.key[:120], "self_us": round(self_time(e), 1), "calls": e.count}
                for e in top
                if self_time(e) > 0
            ]
    finally:
        pool.shutdown()
        engine.close()
        if tmp is not None:
            tmp.cleanup()
        (out / "syncdebug.txt").write_text("\n".join(sync_lines) + "\n")
        (out / "profile.txt").write_text("\n".join(prof_lines) + "\n")
        _write_json(out / "profile.json", report)
    print(json.dumps(report, indent=2))
    return 0


def _preemption(
    engine: Any, pool: ThreadPoolExecutor, workloads: dict[str, tuple[Any, list[Any]]]
) -> dict[str, Any]:
    """A light batch (3 passages of workload b) at the first pause of a heavy batch (workload a
    through ``score_steps``, paced on CUDA) against the same light batch alone, and the heavy
    batch's scores and time stepped against ``score()``."""
    from lychee_server.bench import _sync
    from lychee_server.domain import DEFAULT_INSTRUCTION
    from lychee_server.engine.interface import run_steps

    heavy_q, heavy_docs = workloads["a"]
    light_q, light_docs = workloads["b"]
    hq = engine.prepare_query(DEFAULT_INSTRUCTION, heavy_q, 3200)
    heavy = list(pool.map(lambda d: engine.prepare_pair(hq, d), heavy_docs))
    lq = engine.prepare_query(DEFAULT_INSTRUCTION, light_q, 3200)
    light = [engine.prepare_pair(lq, d) for d in light_docs[:3]]
    try:

        def timed(fn: Any) -> tuple[Any, float]:
            _sync(engine.device)
            t0 = time.perf_counter()
            out = fn()
            _sync(engine.device)
            return out, time.perf_counter() - t0

        engine.score(light)
        _, light_alone = timed(lambda: engine.score(light))
        engine.vision_cache.clear()
        want, heavy_s = timed(lambda: engine.score(heavy))
        engine.vision_cache.clear()
        steps = engine.score_steps(heavy)
        _sync(engine.device)
        t0 = time.perf_counter()
        next(steps)  # the first pause (the host is at most _RUN_AHEAD steps ahead on CUDA)
        pause_at = time.perf_counter() - t0
        _, light_in_pause = timed(lambda: engine.score(light))
        pauses = 1
        t1 = time.perf_counter()
        while True:
            try:
                next(steps)
                pauses += 1
            except StopIteration as stop:
                got = stop.value
                break
        _sync(engine.device)
        stepped_s = pause_at + time.perf_counter() - t1
        engine.vision_cache.clear()
        plain = run_steps(engine.score_steps(heavy))
    finally:
        engine.release(hq)
        engine.release(lq)
    return {
        "heavy_pairs": len(heavy),
        "light_pairs": len(light),
        "pauses": pauses,
        "light_alone_ms": round(light_alone * 1000, 2),
        "light_at_first_pause_ms": round(light_in_pause * 1000, 2),
        "heavy_score_ms": round(heavy_s * 1000, 2),
        "heavy_stepped_ms_without_the_light_batch": round(stepped_s * 1000, 2),
        "stepped_scores_equal_score": got == want and plain == want,
        "max_abs_diff": max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0.0),
    }


# ----------------------------------------------------------------------------------------- summary
def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _key_figures(step: str, out: Path) -> list[tuple[str, str]]:
    """(row label, key figure) for a step; several rows for bench (one per workload)."""
    if step == "wheels":
        d = _load(out / "wheels.json") or {}
        if d.get("error"):
            return [(step, d["error"][:110])]
        if d.get("installed"):
            return [(step, f"installed {len(d['installed'])}: " + ", ".join(d["installed"])[:100])]
        return [(step, "none needed")]
    if step == "preflight":
        d = _load(out / "preflight.json") or {}
        if d.get("problems"):
            return [(step, d["problems"][0][:110])]
        gpu = d.get("gpu")
        yes = {True: "ok", False: "FAIL", None: "n/a"}
        probes = (
            f"varlen {yes[(d.get('varlen_attn') or {}).get('ok')]}, "
            f"fp8 {yes[(d.get('float8') or {}).get('ok')]}, "
            f"compile {yes[(d.get('torch_compile') or {}).get('ok')]}, "
            f"flash_attn {'yes' if (d.get('flash_attn') or {}).get('importable') else 'no'}"
        )
        torch_v = ((d.get("modules") or {}).get("torch") or {}).get("version")
        if gpu:
            head = f"{gpu['name']} sm{gpu['capability']} {gpu['memory_gib']}GiB drv {gpu.get('driver')}"
        else:
            head = f"{d.get('device', '?')} py{d.get('python')} torch {torch_v}"
        return [(step, f"{head}; {probes}")]
    if step.startswith("check-"):
        d = _load(out / f"{step}.json")
        if not d:
            return [(step, "no report")]
        fig = f"{d['pairs']} pairs {d['dtype']} max|dp| {d['max_abs_diff_p']:.1e} (tol {d['tolerance']:.0e})"
        rank = d.get("bf16_ranking")
        if rank:
            fig += f"; bf16 tau min {rank['min_kendall_tau']:.3f}"
        return [(step, fig)]
    if step == "bench":
        d = _load(out / "bench.json")
        if not d:
            return [(step, "no report")]
        peak = d.get("peak_flops")
        source = str(d.get("peak_flops_source") or "").split(":")[0]
        mfu_vs = f"MFU vs {peak / 1e12:.0f} TFLOP/s ({source})" if peak else "no MFU"
        rows = [(step, f"{d.get('machine')} {d.get('dtype')}; {mfu_vs}")]
        for r in d.get("rows", []):
            mem = r["peak_memory_mib"] / 1024
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            rows.append(
                (
                    f"  bench {r['workload']}",
                    f"p50 {r['latency_p50_s']:.3f}s {r['pairs_per_s']:.1f} pairs/s MFU {mfu} "
                    f"peak {mem:.2f}GiB x{r['speedup']:.1f} vs naive",
                )
            )
        return rows
    if step == "profile":
        d = _load(out / "profile.json")
        if not d:
            return [(step, "no report")]
        parts = []
        for name, r in d.get("workloads", {}).items():
            top = (r.get("top") or [{}])[0].get("name", "-")
            parts.append(f"{name}: sync {_fmt(r.get('sync_warnings'), 'd')}, top {top[:28]}")
        rows = [(step, "; ".join(parts))]
        pre = d.get("preemption") or {}
        if pre.get("error"):
            rows.append(("  preemption", f"failed: {pre['error'][:60]}"))
        elif pre:
            rows.append(
                (
                    "  preemption",
                    f"light {_fmt(pre.get('light_alone_ms'), '.1f')} ms alone, "
                    f"{_fmt(pre.get('light_at_first_pause_ms'), '.1f')} ms at a pause of a "
                    f"{_fmt(pre.get('heavy_score_ms'), '.0f')} ms heavy batch; scores equal: "
                    f"{pre.get('stepped_scores_equal_score')}",
                )
            )
        return rows
    if step == "variants":
        d = _load(out / "variants.json")
        if not d:
            return [(step, "no report")]
        vs = d.get("variants", [])
        ran = [v for v in vs if v.get("status") != "skipped"]
        ok = [v for v in ran if v.get("status") == "ok"]
        rows = [(step, f"{len(ok)}/{len(ran)} ok ({len(vs) - len(ran)} skipped)")]
        for v in vs:
            if v.get("status") in ("ok", "mismatch"):
                dp, eng = _fmt(v.get("max_abs_diff_p"), ".1e"), _fmt(v.get("engine_seconds"), ".2f")
                fig = f"{v['status']} max|dp| {dp} engine {eng}s"
            else:
                fig = v.get("status", "?") + (f": {v['error'][:80]}" if v.get("error") else "")
            rows.append((f"  {v['variant']}", fig))
        return rows
    if step == "checkpoint":
        return [(step, _BUILT)]
    return [(step, "")]


_BUILT = "tiny test checkpoint built"


def _last_log_line(path: Path) -> str:
    """The last non-blank line of a step's log (a failed step's reason, usually)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:110] if lines else "empty log"


def _status(rc: str) -> str:
    if rc == "skip":
        return "SKIPPED"
    code = int(rc)
    if code == 0:
        return "ok"
    if code in (124, 137):
        return "TIMEOUT"
    if code == 97:
        return "FAIL(sim)"
    return f"FAIL({code})"


def _summary(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            steps.append((parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else ""))
    table: list[tuple[str, str, str, str]] = []
    records = []
    for name, rc, secs, note in steps:
        status = _status(rc)
        try:
            figures = _key_figures(name, out)
        except Exception as exc:  # a half-written report must not cost the table
            figures = [(name, f"(no key figure: {_err(exc)[:80]})")]
        if status == "SKIPPED":
            figures = [(name, note or "skipped")]
        elif status == "TIMEOUT":
            figures = [(name, f"timed out at its {note or secs}s limit"), *figures[1:]]
        elif status != "ok" and figures[0][1] in ("", "no report", _BUILT):
            figures = [(name, _last_log_line(out / f"{name}.log")), *figures[1:]]
        records.append({"step": name, "rc": rc, "status": status, "seconds": secs, "figures": figures})
        for i, (label, fig) in enumerate(figures):
            table.append((label, status if i == 0 else "", secs if i == 0 else "", fig))
    ok = sum(1 for r in records if r["status"] == "ok")
    _write_json(out / "summary.json", {"steps": records, "ok": ok, "total": len(records)})
    w = max([len(r[0]) for r in table] + [4])
    lines = [f"{'step':<{w}}  {'status':<10} {'secs':>6}  key figure", "-" * (w + 60)]
    lines += [f"{a:<{w}}  {b:<10} {c:>6}  {d}" for a, b, c, d in table]
    lines.append(f"== gpu_check: {ok}/{len(records)} steps ok; reports in {out}")
    print("\n".join(lines))
    return 0


# -------------------------------------------------------------------------------------------- main
def _add_model_flags(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--shape", default=None)
    if dtype:
        p.add_argument("--dtype", default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lychee_server.gpu_check", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wheels")
    p.add_argument("--dir", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--json", type=Path, default=None)
    p = sub.add_parser("fetch-wheels")
    p.add_argument("dir")
    p.add_argument("--python-version", default="3.12")
    p = sub.add_parser("preflight")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, default=None)
    p = sub.add_parser("variants")
    _add_model_flags(p)
    p.add_argument("--json", type=Path, default=None)
    p = sub.add_parser("profile")
    _add_model_flags(p)
    p.add_argument("--out", required=True)
    p.add_argument("--docs-a", type=int, default=0)
    p.add_argument("--docs-b", type=int, default=0)
    p.add_argument("--image-size", default=None, help="WxH of workload (a)'s images")
    p.add_argument("--passage-tokens", type=int, default=0)
    p = sub.add_parser("summary")
    p.add_argument("--out", required=True)
    ns = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    handlers = {
        "wheels": _wheels,
        "fetch-wheels": _fetch_wheels,
        "preflight": _preflight,
        "variants": _variants,
        "profile": _profile,
        "summary": _summary,
    }
    return int(handlers[ns.command](ns))


if __name__ == "__main__":
    sys.exit(main())
