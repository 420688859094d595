"""The decode pool: image bytes that are costly to decode become 28x28 pixels here, in worker
processes, before a query joins a search batch (:mod:`.batcher`), so a costly image never holds
up other searches.

An image takes one of two ways, chosen from its size and header:

- **light**: a PNG, JPEG, GIF, BMP, WebP or TIFF file of at most 64 KB and 320x320 pixels (a
  28x28 digit costs about 0.4 ms, the page's 280x280 canvas about 4 ms, the worst light image
  under 10 ms): decoded in its search batch, where the other queries wait for it at most that
  long.
- **heavy**: anything else (a 4096x4096 PNG costs 0.2-0.7 s, a 4096x4096 JPEG 2000 up to 6 s of
  CPU and 600 MB): decoded by a pool of worker processes at the lowest CPU priority, so they get
  the CPU that searches and the rest of the machine leave idle.

The worker processes are `pebble <https://pypi.org/project/Pebble/>`_'s ``ProcessPool``: unlike
``concurrent.futures.ProcessPoolExecutor`` it gives each task a timeout, stops the worker that
overruns it and starts a new one, and a decoder that crashes takes only its worker down, which it
also replaces (the standard pool breaks as a whole). Each decode is bounded four ways:

- **waiting**: a decode that waited in the pool's queue longer than the budget is refused at
  once with 503 (the service is busy);
- **CPU**: a decode may use half the budget in CPU seconds; the kernel ends the worker beyond it
  (``ITIMER_PROF``, whose signal's default action ends the process): 413, the image itself is too
  costly;
- **wall time**: a decode still running at the end of the budget (it waited for a core) is
  stopped with its worker: 503;
- **memory**: each worker may map :data:`DECODE_MEMORY` more than it maps when idle (beyond it,
  413), so at most :data:`HEAVY_WORKERS` decodes bound the pool's memory.

The pool is bounded: a request that finds :data:`HEAVY_WORKERS` + :data:`HEAVY_QUEUE` heavy images
decoding or waiting is refused at once with 503 and ``Retry-After``. Every kind of overload is
logged at most once per interval (:class:`.overload.OverloadLog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import multiprocessing
import os
import signal
import struct
import threading
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pebble import ProcessExpired, ProcessPool
from PIL import Image

from ..errors import LenetEmbedError
from ..preprocess import MAX_PIXELS, ImageTooLarge
from ..search import Query
from .errors import ApiError
from .overload import RETRY_AFTER, OverloadLog, busy

DECODE_TIMEOUT = 2.0
LIGHT_BYTES = 64 * 1024
LIGHT_PIXELS = 320 * 320
LIGHT_FORMATS = frozenset({"PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"})
HEAVY_WORKERS, HEAVY_QUEUE = 2, 4
# The share of the budget a decode may spend in CPU seconds; the rest is left for waiting for a
# core (the workers run at the lowest priority).
CPU_SHARE = 0.5
# Heavy decodes get the CPU nothing else wants: a core that searches (or other work on the
# machine) keep busy goes to them about 1.5 % of the time; an idle one, all of the time.
HEAVY_NICE = 19
# Memory a worker may map for one decode, beyond what it holds when idle (Linux): the costliest
# accepted image needs about 600 MB.
DECODE_MEMORY = 1024 * 1024 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A body this large holds an image over LIGHT_BYTES, as multipart or as base64 in JSON.
SURELY_HEAVY_BODY = 2 * LIGHT_BYTES


@dataclass(frozen=True)
class Decoded(Query):
    """A query whose image is already 28x28 pixels in the MNIST convention: searching it decodes
    nothing (:meth:`SearchIndex.query` takes :meth:`pixels` as they are)."""

    def pixels(self) -> np.ndarray:
        """The decoded pixels."""
        return self.image  # type: ignore[return-value]


class _Slots:
    """Places in the pool, running or waiting; :meth:`take` never blocks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.size:
                return False
            self.used += 1
            return True

    def give(self, _: object = None) -> None:
        with self._lock:
            self.used -= 1

    @property
    def full(self) -> bool:
        return self.used >= self.size


class DecodePools:
    """The decode pool of one app (the heavy lane; light images pass through); ``budget`` is the
    time budget in seconds of a decode (and of waiting for one)."""

    def __init__(self, budget: float = DECODE_TIMEOUT) -> None:
        self.budget = budget
        self._overload = OverloadLog()
        self._slots = _Slots(HEAVY_WORKERS + HEAVY_QUEUE)
        self._pool: ProcessPool | None = None
        self._lock = threading.Lock()

    def _workers(self) -> ProcessPool:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPool(max_workers=HEAVY_WORKERS, initializer=_prepare_worker,
                                         initargs=(HEAVY_NICE, DECODE_MEMORY),
                                         context=_context())
            return self._pool

    def start(self) -> None:
        """Start the worker processes and have each decode a small image once, so that the
        first heavy image waits neither for a process nor for its first decode."""
        pool = self._workers()
        for _ in range(HEAVY_WORKERS):
            pool.schedule(_decode, (_WARM_UP_NAME, _warm_up_image(), time.monotonic(), 60.0))

    def stop(self) -> None:
        """Stop the worker processes (a later heavy image starts them again)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join(timeout=10)

    def check_room(self, content_length: str | None) -> None:
        """Refuse (503) a request whose body surely holds a heavy image while the pool is full,
        before the body is read."""
        if (content_length is not None and content_length.isdigit()
                and int(content_length) > SURELY_HEAVY_BODY and self._slots.full):
            self._refuse_full()

    async def prepare(self, query: Query) -> Query:
        """``query`` with its image decoded when it is a heavy image file (as a
        :class:`Decoded`); other queries, light images included, as they are (their search batch
        decodes them). Raises :class:`ApiError` (413, 503) or the image's
        :class:`LenetEmbedError`."""
        data = query.image
        if not isinstance(data, bytes) or (len(data) <= LIGHT_BYTES and _is_light(data)):
            return query
        if not self._slots.take():
            self._refuse_full()
        try:
            future = self._schedule(query.title, data)
        except BaseException:
            self._slots.give()
            raise
        # The place is freed when the decode ends, not when this request stops waiting for it.
        future.add_done_callback(self._slots.give)
        try:
            status, value = await asyncio.wrap_future(future)
        except FutureTimeout:
            raise self._overran(503, "the service is busy: decoding this image took over "
                                     f"{self.budget:g} s; retry in a moment") from None
        except ProcessExpired as exc:
            if exc.exitcode == -signal.SIGPROF:  # its CPU budget ran out
                raise self._overran(413, f"{query.title}: decoding this image takes over "
                                         f"{self.budget:g} s; send a smaller image, e.g. a PNG "
                                         "or JPEG of at most 1024x1024 px") from None
            raise LenetEmbedError(f"{query.title}: not a readable image (its decoder failed); "
                                  "give a PNG, JPEG, BMP or GIF file") from None
        except (OSError, RuntimeError) as exc:  # no worker could be started, the pool broke
            self._report("decode worker", f"decode worker unavailable: {exc}")
            raise busy("the service cannot decode this image now; retry in a moment") from None
        if status == "ok":
            return Decoded(image=value, name=query.name)
        if status == "late":
            self._report("heavy decode wait",
                         f"decode queue slow: a heavy image waited {value:.1f} s (budget "
                         f"{self.budget:g} s); answering 503 with Retry-After")
            raise busy(f"the service is busy: this image waited over {self.budget:g} s to be "
                       "decoded; retry in a moment")
        if status == "too_large":
            raise ApiError(413, value)
        raise LenetEmbedError(value)

    def _schedule(self, name: str, data: bytes) -> Future[tuple[str, Any]]:
        """Send one image to the worker processes."""
        return self._workers().schedule(_decode, (name, data, time.monotonic(), self.budget),
                                        timeout=self.budget)

    def _overran(self, status: int, message: str) -> ApiError:
        self._report("heavy decode budget",
                     f"decode budget overrun: a heavy image was still decoding after "
                     f"{self.budget:g} s; its worker was stopped and the request answered "
                     f"{status}")
        return ApiError(status, message, retry_after=RETRY_AFTER if status == 503 else None,
                        kind="decode_timeout")

    def _refuse_full(self) -> None:
        self._report("heavy decode queue",
                     f"decode queue full: {self._slots.size} heavy images decoding or waiting; "
                     "answering 503 with Retry-After")
        raise busy("the service is busy decoding other images; retry in a moment")

    def _report(self, kind: str, message: str) -> None:
        self._overload.refused(kind, message)


_WARM_UP_NAME = "warm-up.png"


@functools.cache
def _warm_up_image() -> bytes:
    """A small PNG with a stroke: what a worker decodes once when it starts."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 13:15] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _is_light(data: bytes) -> bool:
    """Whether an image file is cheap to decode, from its header: a common format and at most
    :data:`LIGHT_PIXELS` pixels, or so many pixels that it is refused from the header anyway.
    A file that does not open is light too: decoding it fails at once, with the reason."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        # A PNG's size is in its first chunk: no need to open it (as the search will).
        width, height = struct.unpack(">II", data[16:24])
        return _light("PNG", width * height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as open_image: a file decodes or raises
            with Image.open(io.BytesIO(data)) as opened:
                return _light(opened.format, opened.width * opened.height)
    except Exception:  # any failure of any format's header parser: the decoder reports it
        return True


def _light(image_format: str | None, pixels: int) -> bool:
    return (image_format in LIGHT_FORMATS and pixels <= LIGHT_PIXELS) or pixels > MAX_PIXELS


@functools.cache
def _context() -> Any:
    """How worker processes start: forked from a server process that has imported this module
    once (the serving process itself, with its threads and sockets, is never forked)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    return context


# ---------------------------------------------------------------------- in the worker processes

_MEMORY = DECODE_MEMORY


def _prepare_worker(nice: int, memory: int) -> None:
    """A worker process's set-up: the lowest priority, a memory bound, no core files, and
    SIGPROF's default action (ending the process) for the CPU budget."""
    global _MEMORY
    _MEMORY = memory
    signal.signal(signal.SIGPROF, signal.SIG_DFL)
    _lower_priority(nice)
    _limit_memory(memory)


def _decode(name: str, data: bytes, queued_at: float, budget: float) -> tuple[str, Any]:
    """In a worker: ``("ok", pixels)``, ``("late", seconds waited)``, or a refusal
    (``"too_large"`` or ``"invalid"`` and the message)."""
    waited = time.monotonic() - queued_at  # CLOCK_MONOTONIC is one clock for every process
    if waited > budget:
        return "late", waited
    over = (f"{name}: decoding this image needs over {_MEMORY // 2**20} MB of memory; send a "
            "smaller image")
    signal.setitimer(signal.ITIMER_PROF, budget * CPU_SHARE)
    try:
        return "ok", Query(image=data, name=name).pixels()
    except ImageTooLarge as exc:
        return "too_large", str(exc)
    except LenetEmbedError as exc:  # open_image reports running out of memory as unreadable
        return (("too_large", over) if isinstance(exc.__context__, MemoryError)
                else ("invalid", str(exc)))
    except MemoryError:
        return "too_large", over
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


def _limit_memory(memory: int) -> None:
    """Let this process map at most ``memory`` bytes beyond what it maps now (Linux), and leave
    no core file when it is ended."""
    with contextlib.suppress(ImportError, ValueError, OSError, IndexError):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        status = Path("/proc/self/status").read_text()
        mapped = int(status.split("VmSize:")[1].split()[0]) * 1024
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory, hard))


def _lower_priority(nice: int) -> None:
    """Make this process run on CPU that the service and the machine leave idle.

    Where Linux groups processes by session for scheduling (autogroup, the default on many
    distributions), the CPU is shared between sessions first and by niceness only within one:
    a nice worker in the service's session would still spend the session's share. So the
    worker also takes a session of its own, niced as a whole."""
    with contextlib.suppress(OSError):
        os.nice(nice)
    with contextlib.suppress(OSError, AttributeError):
        os.setsid()
        Path("/proc/self/autogroup").write_text(str(nice))
