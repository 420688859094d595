"""The decode pool: image bytes that are costly to decode become 28x28 pixels here, in worker
processes, before a query joins a search batch (:mod:`.batcher`), so a costly image never holds
up other searches.

An image takes one of two ways, chosen from its size and header:

- **light**: a PNG, JPEG, GIF, BMP, WebP or TIFF file of at most 64 KB and 320x320 pixels (on
  two cores a 28x28 digit costs about 0.4 ms, the page's 280x280 canvas about 4 ms, the worst
  light image under 10 ms): decoded in its search batch, where the other queries wait for it at
  most that long. (A pool of threads for them cost more than the decoding: 0.7 ms of CPU a
  request in thread hand-offs, a fifth of the service's throughput.)
- **heavy**: anything else (a 4096x4096 PNG costs 0.2-0.7 s, a 4096x4096 JPEG 2000 up to 6 s of
  CPU and 600 MB): decoded by worker processes at the lowest CPU priority, so they get the CPU
  that searches and the rest of the machine leave idle. A decode that overruns the time budget
  is killed with its process (a thread could not be stopped), and a decoder that crashes takes
  only its worker down. At most :data:`HEAVY_WORKERS` decode at once, each within
  :data:`DECODE_MEMORY` (beyond it, 413), which bounds their memory.

The heavy pool is bounded. A request that finds it full, or waits in it longer than the budget,
is refused at once with 503 and ``Retry-After``, logged at most once per interval
(:class:`.overload.OverloadLog`). A heavy decode still running at the end of the budget is 413
when it had the CPU for at least half of it (the image itself is too costly), else 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import multiprocessing
import os
import queue
import struct
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
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


class _Overran(ApiError):
    """A heavy decode killed at the end of its budget (413 or 503)."""


class _NoWorker(ApiError):
    """No worker process could be started (503)."""


class _Slots:
    """Places in a pool, running or waiting; :meth:`take` never blocks."""

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
        # One thread per worker process: a thread takes a worker, sends it the image, waits.
        self._heavy = ThreadPoolExecutor(HEAVY_WORKERS,
                                         thread_name_prefix="lenet-embed-decode-heavy")
        self._heavy_slots = _Slots(HEAVY_WORKERS + HEAVY_QUEUE)
        self._all_workers = [_Worker() for _ in range(HEAVY_WORKERS)]
        self._workers: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self._all_workers:
            self._workers.put(worker)
        # Worker processes end with the pools, even those of an app never shut down.
        weakref.finalize(self, _stop_all, self._all_workers)

    def start(self) -> None:
        """Start the worker processes in the background, so that the first heavy image does not
        wait for them."""
        threading.Thread(target=self._start_workers, name="lenet-embed-decode-start",
                         daemon=True).start()

    def _start_workers(self) -> None:
        for _ in range(HEAVY_WORKERS):
            worker = self._workers.get()
            try:
                with contextlib.suppress(Exception):  # the first heavy image will say why
                    worker.ready(self.budget)
            finally:
                self._workers.put(worker)

    def stop(self) -> None:
        """Stop the worker processes (a later heavy image starts them again)."""
        _stop_all(self._all_workers)

    def check_room(self, content_length: str | None) -> None:
        """Refuse (503) a request whose body surely holds a heavy image while the heavy pool is
        full, before the body is read."""
        if (content_length is not None and content_length.isdigit()
                and int(content_length) > SURELY_HEAVY_BODY and self._heavy_slots.full):
            self._refuse("heavy", self._heavy_slots)

    async def prepare(self, query: Query) -> Query:
        """``query`` with its image decoded when it is a heavy image file (as a
        :class:`Decoded`); other queries, light images included, as they are (their search batch
        decodes them). Raises :class:`ApiError` (413, 503) or the image's
        :class:`LenetEmbedError`."""
        data = query.image
        if not isinstance(data, bytes) or (len(data) <= LIGHT_BYTES and _is_light(data)):
            return query
        try:
            pixels = await self._run("heavy", self._heavy, self._heavy_slots,
                                     self._decode_heavy, query.title, data)
        except ImageTooLarge as exc:
            raise ApiError(413, str(exc)) from None
        return Decoded(image=pixels, name=query.name)

    async def _run(self, lane: str, pool: ThreadPoolExecutor, slots: _Slots, job: Any,
                   name: str, data: bytes) -> Any:
        if not slots.take():
            self._refuse(lane, slots)
        try:
            future: Future[Any] = pool.submit(job, name, data, time.monotonic())
        except BaseException:
            slots.give()
            raise
        # The place is freed when the job ends (or is cancelled before it starts, when its
        # client hangs up), not when this request stops waiting for it.
        future.add_done_callback(slots.give)
        return await asyncio.wrap_future(future)

    def _refuse(self, lane: str, slots: _Slots) -> None:
        self._overload.refused(
            f"{lane} decode queue",
            f"decode queue full: {slots.size} {lane} images decoding or waiting; "
            "answering 503 with Retry-After")
        raise busy("the service is busy decoding other images; retry in a moment")

    def _check_wait(self, lane: str, queued_at: float) -> None:
        waited = time.monotonic() - queued_at
        if waited > self.budget:
            self._overload.refused(
                f"{lane} decode wait",
                f"decode queue slow: a {lane} image waited {waited:.1f} s (budget "
                f"{self.budget:g} s); answering 503 with Retry-After")
            raise busy(f"the service is busy: this image waited over {self.budget:g} s to be "
                       "decoded; retry in a moment")

    def _decode_heavy(self, name: str, data: bytes, queued_at: float) -> np.ndarray:
        """In a heavy thread: the pixels, decoded by a worker process within the budget."""
        self._check_wait("heavy", queued_at)
        worker = self._workers.get()  # there are as many workers as threads: never waits
        try:
            return worker.decode(name, data, self.budget)
        except _Overran as exc:
            self._overload.refused(
                "heavy decode budget",
                f"decode budget overrun: a heavy image was still decoding after "
                f"{self.budget:g} s; its worker was killed and the request answered {exc.status}")
            raise
        except _NoWorker as exc:
            self._overload.refused("decode worker", f"decode worker unavailable: {exc.__cause__}")
            raise
        finally:
            self._workers.put(worker)


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


class _Worker:
    """One decode worker process, started when needed, killed when a decode overruns."""

    def __init__(self) -> None:
        self._process: Any = None
        self._connection: Connection | None = None
        self._dying: Any = None

    def ready(self, patience: float) -> Connection:
        """The pipe to a running worker process, started now if there is none. A killed one
        must have exited first (waiting up to ``patience`` seconds), so that the memory of at
        most one decode per worker is in use at any time."""
        if self._process is not None and self._process.is_alive():
            assert self._connection is not None
            return self._connection
        self.stop()
        if self._dying is not None:
            self._dying.join(patience)
            if self._dying.exitcode is None:
                raise OSError("the previous decoder process has not exited yet")
            self._dying = None
        context = _context()
        parent, child = context.Pipe()
        process = context.Process(target=_serve_decodes, args=(child, HEAVY_NICE, DECODE_MEMORY),
                                  name="lenet-embed-decode", daemon=True)
        process.start()
        child.close()
        self._process, self._connection = process, parent
        return parent

    def stop(self) -> None:
        """Kill the worker process, if any, without waiting for it to exit (at the lowest
        priority that can take seconds; :meth:`ready` waits for it)."""
        process, connection = self._process, self._connection
        self._process = self._connection = None
        if connection is not None:
            connection.close()
        if process is not None:
            with contextlib.suppress(OSError, ValueError):
                process.kill()
            self._dying = process

    def decode(self, name: str, data: bytes, budget: float) -> np.ndarray:
        """The pixels of an image file, or its refusal; the worker is killed when it has not
        answered within ``budget`` seconds."""
        try:
            connection = self.ready(budget)
        except (OSError, RuntimeError, EOFError) as exc:  # out of processes, memory, files
            raise _NoWorker(503, "the service cannot decode this image now; retry in a moment",
                            retry_after=RETRY_AFTER) from exc
        process = self._process
        cpu_before = _cpu_seconds(process.pid)
        overrun: dict[str, float | None] = {}

        def kill() -> None:
            # Its CPU time is read before it dies: did it decode all along, or wait for a core?
            cpu_now = _cpu_seconds(process.pid)
            overrun["cpu"] = None if None in (cpu_before, cpu_now) else cpu_now - cpu_before
            with contextlib.suppress(OSError):
                process.kill()

        # A timer, not a timeout on the pipe: sending a large file can block too.
        watchdog = threading.Timer(budget, kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.send(name)
            connection.send_bytes(data)
            reply = connection.recv()
        except (OSError, EOFError):  # killed by the watchdog, or the decoder crashed
            reply = None
        finally:
            watchdog.cancel()
        if reply is not None:
            status, value = reply
            if status == "ok":
                return value
            if status == "too_large":
                raise ApiError(413, value)
            raise LenetEmbedError(value)
        self.stop()
        if "cpu" not in overrun:
            raise LenetEmbedError(f"{name}: not a readable image (its decoder failed); give a "
                                  "PNG, JPEG, BMP or GIF file")
        cpu = overrun["cpu"]
        if cpu is not None and cpu >= budget / 2:
            raise _Overran(413, f"{name}: decoding this image takes over {budget:g} s; send a "
                                "smaller image, e.g. a PNG or JPEG of at most 1024x1024 px")
        raise _Overran(503, f"the service is busy: decoding this image took over {budget:g} s; "
                            "retry in a moment", retry_after=RETRY_AFTER)


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()


@functools.cache
def _context() -> Any:
    """How worker processes start: forked from a server process that has imported this module
    once (the serving process itself, with its threads and sockets, is never forked)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    return context


def _cpu_seconds(pid: int) -> float | None:
    """The CPU seconds a process has used (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _serve_decodes(connection: Connection, nice: int, memory: int) -> None:
    """A worker process's loop: a name and image bytes in, ``("ok", pixels)`` or a refusal
    (``"too_large"`` or ``"invalid"`` and the message) out, until the pipe
    closes. Each decode may map ``memory`` more bytes."""
    _lower_priority(nice)
    _limit_memory(memory)
    while True:
        try:
            name = connection.recv()
            data = connection.recv_bytes()
        except (EOFError, OSError):
            return
        over = (f"{name}: decoding this image needs over {memory // 2**20} MB of memory; send a "
                "smaller image")
        reply: tuple[str, Any]
        try:
            reply = ("ok", Query(image=data, name=name).pixels())
        except ImageTooLarge as exc:
            reply = ("too_large", str(exc))
        except LenetEmbedError as exc:  # open_image reports running out of memory as unreadable
            reply = (("too_large", over) if isinstance(exc.__context__, MemoryError)
                     else ("invalid", str(exc)))
        except MemoryError:
            reply = ("too_large", over)
        connection.send(reply)


def _limit_memory(memory: int) -> None:
    """Let this process map at most ``memory`` bytes beyond what it maps now (Linux), and leave
    no core file when it is killed."""
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
