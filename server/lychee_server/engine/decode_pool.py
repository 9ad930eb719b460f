"""Image decoding in worker processes: a hard wall-time budget per image, killed on cancellation.

Why processes: a decoder cannot be interrupted from Python. A thread stuck in libjpeg on a hostile
progressive file keeps its CPU, its memory and the thread itself until the C code returns (and the
interpreter joins such threads at exit, so SIGTERM could not end the server either). A process can
be killed at any instant, and its memory goes back to the operating system with it. This module
keeps a few small worker processes (``python -m lychee_server.engine.decode_pool``: Pillow, NumPy
and libjpeg-turbo only, ~30 MB each; never torch, never the server's own ``__main__``), each one
decoding one image at a time with :func:`lychee_server.engine.images.decode_image`:

* the server sends the encoded bytes and gets back the decoded, normalised RGB pixels (after the
  JPEG draft downscale, so at most a few megapixels for a JPEG) over a pipe;
* a decode that runs past ``timeout_s`` is killed, the worker replaced on the next demand, and the
  caller gets ``InvalidInput`` / ``IMAGE_DECODE_FAILED`` naming the limit and its setting;
* :meth:`DecodePool.cancel` kills the decodes of a request that was cancelled or ran out of time
  (and stops its queued ones); :meth:`DecodePool.close` kills every worker at once (shutdown);
* a worker whose resident memory grew past ``recycle_bytes`` after a decode exits (a decode of a
  large image leaves the allocator holding pages; a fresh process returns them), and each worker
  caps its own address space at its start-up size plus the per-image memory budget, so a decode
  that allocates past the budget fails in the worker instead of growing the server;
* a worker stops itself with ``SIGALRM`` shortly after its budget should the server fail to kill
  it, and exits at EOF on its pipe, so it never outlives a dead server by more than that.

Workers start on first use (``prestart`` at warm-up), so a text-only deployment never pays for them.
Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one task (only break the whole
pool), and its workers re-import the parent's ``__main__`` (the CLI, torch included) in every child.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from PIL import Image

from lychee_server.domain import ImageInput, MediaType
from lychee_server.engine.images import ImageLimits, MiB, decode_image
from lychee_server.errors import Cancelled, InvalidInput, Unavailable

__all__ = ["DecodePool"]

log = logging.getLogger(__name__)

_MODULE = "lychee_server.engine.decode_pool"
# Native libraries in the worker must not start thread pools of their own (one image, one core).
_NICE = 19  # decoders: the lowest CPU priority (batch work; the server's threads come first)
_STARTUP_S = 60.0  # a worker's interpreter must boot within this (it takes ~0.1 s)
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True, slots=True)
class _WorkerConfig:
    limits: dict[str, int]
    timeout_s: float
    recycle_bytes: int
    address_space_bytes: int  # 0 = no cap


class _Worker:
    """One decoder process and its two pipes (the server's side)."""

    def __init__(self, config: _WorkerConfig) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env.update({name: "1" for name in _THREAD_ENV})
        # The package may be importable only through the server's sys.path (a source checkout).
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    _MODULE,
                    str(to_child_r),
                    str(from_child_w),
                    json.dumps(asdict(config)),
                ],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise
        os.close(to_child_r)
        os.close(from_child_w)
        self.send = Connection(to_child_w, readable=False)
        self.recv = Connection(from_child_r, writable=False)
        self.ready = False  # its "ready" message was read (the interpreter has booted)
        self.token: object | None = None  # the request a busy worker decodes for
        self.killed_for: str | None = None  # why the server killed it: "cancelled", "timeout", "closed"

    def kill(self, why: str) -> None:
        """SIGKILL (non-blocking); the thread waiting on this worker sees EOF and reaps it."""
        if self.killed_for is None:
            self.killed_for = why
        with contextlib.suppress(OSError):
            self.proc.kill()

    def reap(self) -> None:
        """Close the pipes and collect the exit status (the process is dead or dying)."""
        for conn in (self.send, self.recv):
            with contextlib.suppress(OSError):
                conn.close()
        if self.proc.poll() is None:
            self.kill(self.killed_for or "retired")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)


@dataclass(eq=False)
class _Token:
    token: object
    waiting: int = 0
    cancelled: bool = False


class DecodePool:
    """Up to ``processes`` decoder processes; :meth:`decode` blocks the calling thread only.

    Thread-safe. ``token`` groups the decodes of one request so :meth:`cancel` can stop them all
    (compared by identity: two requests with equal content are different requests).
    """

    def __init__(
        self,
        processes: int,
        limits: ImageLimits,
        *,
        timeout_s: float = 10.0,
        recycle_bytes: int = 256 * MiB,
        memory_cap: bool = True,
    ) -> None:
        if processes < 1:
            raise ValueError("a decode pool needs at least one process")
        self.processes = processes
        self.limits = limits
        self.timeout_s = timeout_s
        headroom = 256 * MiB  # interpreter growth, pipe buffers, the RGB copy sent back
        self._config = _WorkerConfig(
            limits=asdict(limits),
            timeout_s=timeout_s,
            recycle_bytes=recycle_bytes,
            address_space_bytes=limits.max_decode_bytes + headroom if memory_cap else 0,
        )
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._spawning = 0
        self._waiting = 0  # callers waiting for a free worker
        self._tokens: dict[int, _Token] = {}
        self._closed = False
        self.started = 0  # worker processes started so far (tests, metrics)
        self.killed = 0  # worker processes killed (timeouts, cancellations)

    # ------------------------------------------------------------------ public
    def decode(self, image: ImageInput, token: object | None = None) -> Image.Image:
        """Decode ``image`` in a worker: the RGB image :func:`decode_image` returns.

        Raises ``InvalidInput`` (bad image, or over the time budget), ``Cancelled`` (the request
        of ``token`` was cancelled), ``Unavailable`` (the pool is closed)."""
        state = self._register(token)
        try:
            worker = self._acquire(state)
        except BaseException:
            self._unregister(state)
            raise
        broken = True
        try:
            result, broken = self._run(worker, image)
            return result
        finally:
            self._release(worker, broken)
            self._unregister(state)

    def cancel(self, token: object) -> None:
        """Stop every decode of ``token``: running ones are killed, queued ones never start."""
        with self._cond:
            state = self._tokens.get(id(token))
            if state is None or state.token is not token:
                return
            state.cancelled = True
            for worker in self._busy:
                if worker.token is token:
                    worker.kill("cancelled")
                    self.killed += 1
            self._cond.notify_all()

    def prestart(self) -> None:
        """Start every worker now (their interpreters boot in the background)."""
        with self._cond:
            missing = self.processes - len(self._idle) - len(self._busy) - self._spawning
            if self._closed or missing <= 0:
                return
            self._spawning += missing
        started: list[_Worker] = []
        try:
            for _ in range(missing):
                started.append(_Worker(self._config))
        finally:
            with self._cond:
                self._spawning -= missing
                self.started += len(started)
                if self._closed:
                    for worker in started:
                        worker.kill("closed")
                else:
                    self._idle.extend(started)
                    started = []
                self._cond.notify_all()
            for worker in started:
                worker.reap()

    def close(self) -> None:
        """Kill every worker now; running decodes fail with ``Unavailable``. Idempotent."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            for worker in self._busy:
                worker.kill("closed")
            self._cond.notify_all()
        for worker in idle:
            worker.kill("closed")
            worker.reap()

    @property
    def busy(self) -> int:
        """Workers decoding now."""
        with self._cond:
            return len(self._busy)

    @property
    def waiting(self) -> int:
        """Callers waiting for a free worker."""
        with self._cond:
            return self._waiting

    @property
    def live(self) -> int:
        """Worker processes alive or starting."""
        with self._cond:
            return len(self._idle) + len(self._busy) + self._spawning

    # ------------------------------------------------------------------ slots
    def _register(self, token: object | None) -> _Token | None:
        if token is None:
            return None
        with self._cond:
            state = self._tokens.get(id(token))
            if state is None or state.token is not token:
                state = self._tokens[id(token)] = _Token(token)
            state.waiting += 1
            return state

    def _unregister(self, state: _Token | None) -> None:
        if state is None:
            return
        with self._cond:
            state.waiting -= 1
            if state.waiting == 0 and self._tokens.get(id(state.token)) is state:
                del self._tokens[id(state.token)]

    def _acquire(self, state: _Token | None) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
                if state is not None and state.cancelled:
                    raise Cancelled("the request was cancelled")
                if self._idle:
                    worker = self._idle.pop()
                    worker.token = state.token if state is not None else None
                    self._busy.add(worker)
                    return worker
                if len(self._busy) + self._spawning < self.processes:
                    self._spawning += 1
                    break
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
        try:
            worker = _Worker(self._config)
        except BaseException:
            with self._cond:
                self._spawning -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._spawning -= 1
            self.started += 1
            worker.token = state.token if state is not None else None
            self._busy.add(worker)
            if self._closed:
                worker.kill("closed")
            elif state is not None and state.cancelled:
                worker.kill("cancelled")
        return worker

    def _release(self, worker: _Worker, broken: bool) -> None:
        with self._cond:
            self._busy.discard(worker)
            worker.token = None
            keep = not broken and not self._closed and worker.killed_for is None
            if keep:
                self._idle.append(worker)
            self._cond.notify_all()
        if not keep:
            worker.reap()

    # ------------------------------------------------------------------ one decode
    def _run(self, worker: _Worker, image: ImageInput) -> tuple[Image.Image, bool]:
        """Send ``image`` to ``worker`` and wait for its answer; (image, worker is done for)."""
        start = time.monotonic()
        try:
            if not worker.ready:  # boot time is not decode time: the budget starts after it
                if not wait([worker.recv], _STARTUP_S) or worker.recv.recv_bytes() != b"ready":
                    worker.kill("startup")
                    raise EOFError("the decoder process did not start")
                worker.ready = True
                start = time.monotonic()
            worker.send.send_bytes(image.media_type.value.encode())
            worker.send.send_bytes(image.data)
            if not wait([worker.recv], self.timeout_s):
                with self._cond:
                    worker.kill("timeout")
                    self.killed += 1
            head = json.loads(worker.recv.recv_bytes())
            payload = worker.recv.recv_bytes() if head["ok"] else b""
        except (EOFError, OSError, ValueError) as exc:
            raise self._died(worker, time.monotonic() - start) from exc
        if not head["ok"]:
            raise InvalidInput(str(head["message"]), reason=str(head["reason"]))
        width, height = head["size"]
        return Image.frombytes("RGB", (int(width), int(height)), payload), bool(head.get("exit"))

    def _died(self, worker: _Worker, seconds: float) -> Exception:
        """The error for a decode whose worker died before answering."""
        why = worker.killed_for
        if why == "cancelled":
            return Cancelled("the request was cancelled while its image was being decoded")
        if why == "closed":
            return Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        if why == "timeout":
            return InvalidInput(
                f"decoding the image took longer than the server's limit of {self.timeout_s:g} s "
                "per image (image_decode_timeout_s); the decode was stopped",
                reason="IMAGE_DECODE_FAILED",
            )
        worker.reap()
        code = worker.proc.returncode
        log.warning("an image decoder process died (exit status %s) after %.2f s", code, seconds)
        if code == -signal.SIGALRM:  # its own watchdog: the server did not stop it in time
            return InvalidInput(
                f"decoding the image took longer than the server's limit of {self.timeout_s:g} s "
                "per image (image_decode_timeout_s); the decode was stopped",
                reason="IMAGE_DECODE_FAILED",
            )
        return InvalidInput(
            "the image could not be decoded: the decoder process stopped on it", reason="IMAGE_DECODE_FAILED"
        )


# ---------------------------------------------------------------------- the worker process
def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _vm_size_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cap_address_space(extra: int) -> None:
    """Limit this process's address space to what it maps now plus ``extra`` bytes."""
    if extra <= 0:
        return
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        base = _vm_size_bytes()
        if base:
            resource.setrlimit(resource.RLIMIT_AS, (base + extra, base + extra))


def _decode_one(data: bytes, media: str, limits: ImageLimits) -> tuple[dict[str, Any], bytes]:
    try:
        rgb = decode_image(ImageInput(data, MediaType(media)), limits)
        return {"ok": True, "size": list(rgb.size)}, rgb.tobytes()
    except InvalidInput as exc:
        return {"ok": False, "reason": exc.reason, "message": exc.message, "exit": False}, b""
    except MemoryError:
        return {
            "ok": False,
            "reason": "IMAGE_TOO_MANY_PIXELS",
            "message": f"decoding the image needs more than the server's budget of "
            f"{limits.max_decode_bytes // MiB} MiB per image (image_decode_memory_mib)",
            "exit": True,
        }, b""
    except Exception as exc:  # a decoder bug on odd input: the image is refused, the worker renewed
        return {
            "ok": False,
            "reason": "IMAGE_DECODE_FAILED",
            "message": f"the image could not be decoded ({type(exc).__name__})",
            "exit": True,
        }, b""


def _worker_main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the server to handle
    with contextlib.suppress(OSError, AttributeError):
        os.nice(_NICE)  # the server's own threads (text work, the device loop) come first for the CPU
    rfd, wfd, config = int(argv[0]), int(argv[1]), _WorkerConfig(**json.loads(argv[2]))
    limits = ImageLimits(**config.limits)
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # PIL's own ceiling is ours in a worker
    import simplejpeg  # noqa: F401  (loaded before the address space is capped)

    recv = Connection(rfd, writable=False)
    send = Connection(wfd, readable=False)
    _cap_address_space(config.address_space_bytes)
    baseline = _rss_bytes()
    send.send_bytes(b"ready")
    watchdog = config.timeout_s + 2.0  # the server kills first; this is for a server that cannot
    while True:
        try:
            media = recv.recv_bytes().decode()
            data = recv.recv_bytes()
        except (EOFError, OSError):
            return 0  # the server closed the pipe: nothing more to do
        signal.setitimer(signal.ITIMER_REAL, watchdog)  # SIGALRM's default action ends the process
        head, payload = _decode_one(data, media, limits)
        signal.setitimer(signal.ITIMER_REAL, 0)
        del data
        if head.get("ok"):
            head["exit"] = _rss_bytes() - baseline > config.recycle_bytes
        try:
            send.send_bytes(json.dumps(head).encode())
            if head["ok"]:
                send.send_bytes(payload)
        except OSError:
            return 0
        if head["exit"]:
            return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
