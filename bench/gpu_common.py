"""What the GPU scripts (gpu_parity.py, gpu_model.py, gpu_train.py) share: the machine and kernel report, the
exit statuses, one JSON document per run, and bf16 models built on the device.

Exit statuses, the same in every script and in gpu_check.sh:
    0  measured (and, for parity, every check passed)
    1  a parity check failed
    2  --require-kernels and the mamba-ssm / causal-conv1d kernels are unavailable (the reason is in the JSON)
    3  no CUDA device: nothing measured (the JSON says so)
    4  the run crashed (out of memory, a kernel error ...): the JSON holds the error and what was measured
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXIT_OK, EXIT_PARITY_FAILED, EXIT_NO_KERNELS, EXIT_NO_CUDA, EXIT_CRASHED = 0, 1, 2, 3, 4


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--require-kernels", action="store_true",
                        help="exit 2 with the reason when the CUDA kernels are unavailable, instead of "
                             "measuring the pure-PyTorch path")
    parser.add_argument("--json", type=Path, help="also write the JSON document to this file")


def environment() -> dict:
    """The torch build, the device and whether the kernel path is available (and why not)."""
    import torch

    from model.scan import kernel_status

    available, reason = kernel_status()
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "torch_cuda_build": torch.version.cuda, "cuda_available": cuda,
            "device": torch.cuda.get_device_name() if cuda else None,
            "kernels_available": available, "kernels_reason": reason}


def preflight(report: dict, require_kernels: bool) -> int | None:
    """The exit status of a run that cannot measure (with ``report["error"]`` saying why), else None."""
    status = None
    if require_kernels and not report["kernels_available"]:
        report["error"] = f"kernels required but unavailable: {report['kernels_reason']}"
        status = EXIT_NO_KERNELS
    elif not report["cuda_available"]:
        report["error"] = "no CUDA device: nothing measured"
        status = EXIT_NO_CUDA
    if status is not None:
        print(f"{report.get('script', 'gpu')}: {report['error']}", file=sys.stderr)
    return status


def run_checked(report: dict, require_kernels: bool, path: Path | None, body) -> int:
    """A GPU script's main: stop with the preflight's status (and the JSON saying why), else ``guarded``."""
    status = preflight(report, require_kernels)
    if status is not None:
        emit(report, path)
        return status
    return guarded(report, path, body)


def guarded(report: dict, path: Path | None, body) -> int:
    """``body()``'s exit status; if it raises, the JSON still comes out, with the error and whatever
    ``body`` had put in ``report`` (a crash must not read like a parity failure: Python's own status is 1)."""
    try:
        return body()
    except Exception as exc:
        traceback.print_exc()
        report["error"] = f"crashed: {type(exc).__name__}: {exc}"
        emit(report, path)
        return EXIT_CRASHED


def emit(report: dict, path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


@contextmanager
def building_on(device, dtype):
    """Parameters are created on ``device`` in ``dtype``: a 13B-parameter bench model never exists in fp32
    on the host (a meta device builds nothing at all)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(cfg, device, dtype):
    """A ``Jamba`` built directly on ``device``; ``A_log`` is made float32 on purpose, so the final cast (on
    the device, of that one tensor per layer) puts every parameter in ``dtype``."""
    from model import Jamba

    with building_on(device, dtype):
        model = Jamba(cfg)
    return model.to(dtype)
