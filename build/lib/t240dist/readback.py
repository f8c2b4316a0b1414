"""Device values read on the host without waiting for the GPU: copies and timings that land behind the
step's work and are read once they have passed, so no training step synchronises the device."""

from __future__ import annotations

import torch


def host_copy(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``tensor`` on the host without waiting for the device: a CUDA tensor is copied to pinned memory
    behind the work queued so far, and the returned (timing) event passes once the copy has landed; a
    host tensor is cloned at once, with no event."""
    if not tensor.is_cuda:
        return tensor.clone(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
    return host, timing_event()


def timing_event() -> torch.cuda.Event:
    """A timing event recorded on the current CUDA stream, behind the work queued so far."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
