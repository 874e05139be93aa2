"""A prefetching iterator: host batches prepared and copied to the device by a background thread.

While the training step of batch k runs, a thread gathers batch k+1 on the host (into pinned memory on
CUDA) and starts its copy to the device on a stream of its own; the consumer makes its stream wait for
that copy before it uses the batch. The thread only moves data: the random numbers of an augmentation
are drawn from per-batch seeds (bench.core.frame_batches), so the results do not depend on how the
thread is scheduled.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

PREFETCH_DEPTH = 2  # batches prepared ahead of the one being trained on
_POLL_SECONDS = 0.05


@dataclass
class InFlight:
    """A batch whose copy to the device may still be running: ``tensors`` (on the device), ``ready`` (the
    copy's CUDA event, None when the copy was synchronous) and what travelled with it (``extra``)."""

    tensors: tuple[torch.Tensor, ...]
    ready: Any
    extra: Any

    def wait(self) -> tuple[torch.Tensor, ...]:
        """The tensors, usable on the current stream (waits for the copy there, without blocking the host)."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.tensors[0].device)
            stream.wait_event(self.ready)
            for tensor in self.tensors:
                tensor.record_stream(stream)  # the allocator must not reuse it before this stream is done
        return self.tensors


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host buffer, in pinned (page-locked) memory when it will be copied to a CUDA device."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def copier(device: torch.device) -> Callable[[tuple[torch.Tensor, ...], Any], InFlight]:
    """A function starting the copy of host tensors to ``device``: on CUDA, non-blocking on a side stream
    (so that it overlaps the computation on the default stream), elsewhere a plain ``.to``."""
    if device.type != "cuda":
        return lambda tensors, extra: InFlight(tuple(t.to(device) for t in tensors), None, extra)
    stream = torch.cuda.Stream(device)

    def copy(tensors: tuple[torch.Tensor, ...], extra: Any) -> InFlight:
        with torch.cuda.stream(stream):
            moved = tuple(t.to(device, non_blocking=True) for t in tensors)
            ready = torch.cuda.Event()
            ready.record(stream)
        return InFlight(moved, ready, extra)

    return copy


def prefetch(items: Iterator[Any], depth: int = PREFETCH_DEPTH) -> Iterator[Any]:
    """The items of ``items`` in order, produced by a background thread up to ``depth`` ahead.

    An exception raised while producing is raised here, at the item it replaced. Leaving the loop early
    (``break``, an exception in the consumer) stops the thread.
    """
    slots: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((False, item)):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            put((True, error))
            return
        put((True, None))

    thread = threading.Thread(target=produce, name="bench-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            finished, value = slots.get()
            if finished:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()
