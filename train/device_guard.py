"""NCCL's device rule, enforced on CPU ranks: every tensor a collective receives must live on the
accelerator's current device.

Gloo accepts CPU tensors, so on CPU ranks a collective on a tensor built on the host (``torch.tensor(x)``
without ``device=``) works, while the same line crashes the first NCCL call of a GPU run. On CPU both are
``device('cpu')``, so the device alone cannot tell them apart. The guard therefore does two things:

* every collective of ``torch.distributed`` (and so of ``deepspeed.comm`` and the differentiable
  ``torch.distributed.nn`` ones, which call it) checks that each tensor argument is on ``device``;
* inside ``track_host_tensors()`` (the training loop), a ``TorchFunctionMode`` marks tensors that would be
  on the host of a GPU machine: those made by a factory (``torch.tensor``, ``torch.zeros``, ...) without a
  ``device`` argument, ``torch.from_numpy``, and whatever is computed from host tensors only. ``.to(device)``
  clears the mark. A collective given a marked tensor fails as NCCL would.

Enabled by ``JAMBA_GUARD_COLLECTIVES=1`` (the trainer installs it before DeepSpeed creates its groups); tests
run the real training loop under it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ENV = "JAMBA_GUARD_COLLECTIVES"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
               "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv")
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}


class CollectiveDeviceError(RuntimeError):
    pass


class _HostTracker(TorchFunctionMode):
    """Marks tensors that a GPU run would hold on the host (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._host: dict[int, weakref.ref] = {}

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def _forget(self, key: int, _ref: weakref.ref) -> None:
        self._host.pop(key, None)

    def _mark(self, value, host: bool) -> None:
        for t in tree_flatten(value)[0]:
            if isinstance(t, torch.Tensor):
                if host:
                    key = id(t)
                    self._host[key] = weakref.ref(t, functools.partial(self._forget, key))
                else:
                    self._host.pop(id(t), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            self._mark(out, "device" not in kwargs)
        elif func is torch.Tensor.cuda or (func is torch.Tensor.to and (
                "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:]))):
            self._mark(out, False)  # moved to a device (on CPU ranks, .to('cpu') returns the same tensor)
        elif self._host:  # nothing to propagate while no host tensor is alive (the common case: cheap)
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if inputs and all(self.is_host(t) for t in inputs):  # host op host -> host; host op device -> device
                self._mark(out, True)
        return out


_tracker: _HostTracker | None = None


def _check(name: str, device: torch.device, args, kwargs) -> None:
    for t in tree_flatten((args, kwargs))[0]:
        if not isinstance(t, torch.Tensor):
            continue
        if t.device != device:
            raise CollectiveDeviceError(f"torch.distributed.{name}: a tensor on {t.device}, but the collective "
                                        f"backend needs {device} (NCCL has no CPU path)")
        if _tracker is not None and _tracker.is_host(t):
            raise CollectiveDeviceError(f"torch.distributed.{name}: a tensor built on the host (a factory call "
                                        f"without device=, or from numpy); on a GPU run it would be on the CPU "
                                        f"and NCCL would fail; create it on {device}")


def install(device: torch.device) -> None:
    """Wrap every collective of torch.distributed (both the package names and distributed_c10d's)."""
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        original = getattr(c10d, name, None)
        if original is None or getattr(original, "_device_guarded", False):
            continue

        def guarded(*args, _name=name, _original=original, **kwargs):
            _check(_name, device, args, kwargs)
            return _original(*args, **kwargs)

        functools.update_wrapper(guarded, original)
        guarded._device_guarded = True
        setattr(c10d, name, guarded)
        if hasattr(dist, name):
            setattr(dist, name, guarded)


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


@contextlib.contextmanager
def track_host_tensors() -> Iterator[None]:
    global _tracker
    tracker = _HostTracker()
    from_numpy = torch.from_numpy

    def host_from_numpy(array):  # not dispatched through torch functions, so wrapped here
        tensor = from_numpy(array)
        tracker._mark(tensor, True)
        return tensor

    _tracker, torch.from_numpy = tracker, host_from_numpy
    try:
        with tracker:
            yield
    finally:
        _tracker, torch.from_numpy = None, from_numpy
