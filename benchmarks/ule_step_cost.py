"""Cost of one ULE training step relative to one ERM step, on the same backbone and batch (CPU).

Time: the real ``update()`` of methods/erm.py and methods/ule.py, measured interleaved in one
process (ERM, then each ULE setting, then ERM again, ...), after warm-up steps; the median over the
repeats is reported, and each ratio is the ratio of medians. Peak memory: each measurement runs in a
fresh subprocess that reads the peak resident set size of the process (VmHWM, what ru_maxrss reports
minus the peak inherited from the parent, see _peak_rss_kib) after creating the batch and resetting
the peak (Linux ``/proc/self/clear_refs``),
and again after building the method and running its steps; the difference is the memory the method
needs (models, optimiser state, gradients, activations and autograd graphs). The child runs with
glibc's malloc told to return freed tensors to the OS (see MALLOC_ENV), and first runs one step of a
throwaway model so that the kernel libraries' one-time initialisation is not counted. tracemalloc
does not see torch's allocations, hence this. Linux only.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/ule_step_cost.py            # every backbone of CASES
    OMP_NUM_THREADS=1 python benchmarks/ule_step_cost.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (label, method, hparam overrides): the default ULE step, the one-backward student variant, and a
# warm-up step (penalty off: two plain ERM steps).
SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("erm", "erm", {}),
    ("ule (default: logit_centred, mse)", "ule", {}),
    ("ule (grad_target=logit_true)", "ule", {"grad_target": "logit_true"}),
    ("ule (grad_target=loss)", "ule", {"grad_target": "loss"}),
    ("ule (warm-up epoch, penalty off)", "ule", {"warmup_epochs": 1}),
]

# glibc keeps freed memory for reuse and raises its mmap threshold dynamically, so the RSS of a
# process follows its largest past allocation pattern rather than its live tensors. A fixed 64 KiB
# mmap threshold (every tensor above it gets its own mapping, returned to the OS when freed) and no
# trim threshold make the peak RSS track the peak of live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

# (label, backbone, batch size, image size)
CASES: list[tuple[str, str, int, int]] = [
    ("small-cnn 3x28x28, batch 128", "small-cnn", 128, 28),
    ("resnet18 3x64x64, batch 64", "resnet18", 64, 64),
    # Depthwise convolutions: their double backward (ULE's penalty) has no fused CPU kernel in torch.
    ("efficientnet-lite0 3x64x64, batch 32", "efficientnet-lite0", 32, 64),
]


def _build(method_name: str, overrides: dict[str, Any], backbone: str, seed: int = 0) -> Any:
    import torch

    from bench.core.backbones import build_backbone
    from methods import get_method
    from methods.base import MethodContext, resolve_hparams

    method_cls = get_method(method_name)
    protocol = {"backbone": backbone, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
    hparams = resolve_hparams(method_cls, "step-cost", protocol, overrides)
    torch.manual_seed(seed)
    context = MethodContext(hparams=hparams, dataset_info={"n_classes": 2, "n_groups": 4},
                            device=torch.device("cpu"), make_model=lambda: build_backbone(backbone, 2), seed=seed)
    return method_cls(context)


def _batch(batch_size: int, image_size: int) -> Any:
    import torch

    from methods.base import Batch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    y = torch.randint(0, 2, (batch_size,), generator=generator)
    return Batch(x=x, y=y, index=torch.arange(batch_size))


def measure_time(backbone: str, batch_size: int, image_size: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per update() of every setting, interleaved round-robin."""
    batch = _batch(batch_size, image_size)
    methods = {label: _build(name, overrides, backbone) for label, name, overrides in SETTINGS}
    for method in methods.values():
        for _ in range(warmup):
            method.update(batch)
    seconds: dict[str, list[float]] = {label: [] for label in methods}
    for repeat in range(repeats):
        order = list(methods) if repeat % 2 == 0 else list(reversed(methods))
        for label in order:
            started = time.perf_counter()
            methods[label].update(batch)
            seconds[label].append(time.perf_counter() - started)
    return {label: statistics.median(values) for label, values in seconds.items()}


def child_memory(setting: int, backbone: str, batch_size: int, image_size: int, steps: int) -> None:
    """Run in a fresh process: print the peak-RSS increase (KiB) of ``steps`` updates, as JSON."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    batch = _batch(batch_size, image_size)
    # One step of a throwaway ERM model first: the first convolution loads and initialises the
    # kernel libraries (hundreds of MiB on CPU), a one-time cost that belongs to neither method.
    _build("erm", {}, backbone, seed=1).update(batch)
    gc.collect()
    # Importing torch peaks above its steady state; without a reset, a small model's steps would
    # stay under that import peak and ru_maxrss would not move. Linux resets the peak RSS (which
    # ru_maxrss reports) when "5" is written to /proc/self/clear_refs.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _peak_rss_kib()
    _, name, overrides = SETTINGS[setting]
    method = _build(name, overrides, backbone)
    for _ in range(steps):
        method.update(batch)
    after = _peak_rss_kib()
    print(json.dumps({"before_kib": before, "after_kib": after}))


def _peak_rss_kib() -> int:
    """The process's peak RSS since the last reset: VmHWM of /proc/self/status.

    Not ``resource.getrusage(...).ru_maxrss``: that is max(VmHWM, a peak inherited from the parent
    across fork and exec), so a child of a large parent reports the parent's peak and never moves.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM (the memory measurement needs Linux)")


def measure_memory(backbone: str, batch_size: int, image_size: int, steps: int) -> dict[str, float]:
    """MiB of peak RSS each setting adds, each in its own subprocess."""
    result = {}
    for index, (label, _, _) in enumerate(SETTINGS):
        output = subprocess.run(
            [sys.executable, __file__, "--child-memory", str(index), "--backbone", backbone,
             "--batch-size", str(batch_size), "--image-size", str(image_size), "--steps", str(steps)],
            capture_output=True, text=True, check=True, env={**os.environ, **MALLOC_ENV},
        ).stdout
        values = json.loads(output.strip().splitlines()[-1])
        result[label] = (values["after_kib"] - values["before_kib"]) / 1024
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--cases", nargs="*", help="only these backbones (small-cnn, resnet18, efficientnet-lite0)")
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory is not None:
        child_memory(args.child_memory, args.backbone, args.batch_size, args.image_size, args.steps)
        return 0

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    for label, backbone, batch_size, image_size in CASES:
        if args.cases and backbone not in args.cases:
            continue
        small = backbone == "small-cnn"
        repeats = (5 if args.quick else 21) if small else (3 if args.quick else 7)
        times = measure_time(backbone, batch_size, image_size, repeats=repeats, warmup=2)
        memory = measure_memory(backbone, batch_size, image_size, steps=3)
        erm_time, erm_memory = times["erm"], memory["erm"]
        print(f"\n{label}: median of {repeats} interleaved steps; peak-RSS increase over 3 steps, fresh process each")
        print("| setting | ms/step | time vs ERM | peak RSS added (MiB) | memory vs ERM |")
        print("|---|---|---|---|---|")
        for setting, _, _ in SETTINGS:
            print(f"| {setting} | {1000 * times[setting]:.1f} | {times[setting] / erm_time:.2f}x "
                  f"| {memory[setting]:.0f} | {memory[setting] / erm_memory:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
