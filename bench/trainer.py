"""The one trainer: runs a method's stages on a dataset, evaluates, records and checkpoints.

Data flows one way: dataset -> trainer (calls the method) -> evaluator -> records. The trainer
knows nothing about any particular method; methods know nothing about files or evaluation (what a
method caches goes through the artifact store of its context).

Reproducibility: the model initialisation and every random draw of training come from the run's
seed; the order of examples in an epoch comes from a generator seeded by (seed, stage, epoch), and so
do the random numbers of its data augmentations (:func:`augmentation_seed`), so a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.core import records
from bench.core.device_data import DeviceData
from bench.core.errors import BenchError, DataError
from bench.core.metrics import GroupStructure, summarize
from bench.core.records import RunDir
from bench.core.selection import RULES, select
from methods.base import Batch, Method


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run is marked failed."""


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cpu``/``cuda``/``cuda:N``/``mps`` force one."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise BenchError(f"--device {requested!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels() -> None:
    """Ask PyTorch for deterministic kernels only (``bench run --deterministic``).

    On the CPU the harness is already bit-reproducible at a fixed thread count; on CUDA, atomic
    adds in some backward kernels (convolutions, scatter) make two runs of one seed differ
    slightly. cuBLAS needs a fixed workspace for determinism, set here unless the user set one (it
    must be set before the first cuBLAS call, which is why this runs before any model is built).
    The harness's own counting avoids the CUDA ops that have no deterministic kernel; a backbone op
    without one (e.g. adaptive average pooling's backward on CUDA) makes PyTorch warn, naming it,
    and the run goes on: a warning in the log means that run is not bit-reproducible on CUDA.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_generator(seed: int, stage_index: int, epoch: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + stage_index * 10_007 + epoch)
    return generator


def augmentation_seed(seed: int, stage_index: int, epoch: int) -> int:
    """The seed of an epoch's training augmentations (DeviceData derives one per batch from it): a function
    of (seed, stage, epoch) alone, like the epoch's order, and independent of that order's generator."""
    digest = hashlib.sha256(f"augment/{seed}/{stage_index}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Progress:
    """Progress display: a tqdm bar per epoch, or nothing with quiet."""

    quiet: bool = False
    label: str = ""

    def bar(self, total: int, description: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"{self.label} {description}".strip(), disable=self.quiet, leave=False,
                    dynamic_ncols=True, mininterval=0.5)

    def message(self, text: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(text)


def evaluate(method: Method, data: DeviceData) -> dict[str, dict[str, dict[str, list[int]]]]:
    """Per-group counts of every predictor of the method on val and test."""
    result: dict[str, dict[str, dict[str, list[int]]]] = {}
    for name, model in method.predictors().items():
        result[name] = {}
        for split in ("val", "test"):
            predictions = data.predict(model, split).argmax(dim=1)
            result[name][split] = data.group_counts(predictions, split)
    return result


def summarize_run(
    metric_records: list[dict[str, Any]], structure: GroupStructure, rules: list[str] | None = None
) -> dict[str, Any]:
    """For each selection rule and each predictor: the chosen evaluation and its val/test metrics."""
    predictors = sorted({name for r in metric_records for name in r.get("eval", {})})
    summary: dict[str, Any] = {}
    for rule in rules or [r for r in RULES if r != "oracle-test"]:
        summary[rule] = {}
        for predictor in predictors:
            index = select(metric_records, predictor, structure, rule)
            record = metric_records[index]
            summary[rule][predictor] = {
                "record_index": index,
                "stage": record["stage"],
                "epoch": record["epoch"],
                **{
                    split: summarize(*(record["eval"][predictor][split][k] for k in ("correct", "total")), structure)
                    for split in ("val", "test")
                },
            }
    return summary


def train(
    method: Method,
    data: DeviceData,
    run_dir: RunDir,
    seed: int,
    structure: GroupStructure,
    progress: Progress,
    on_epoch_end: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train ``method`` to completion (resuming from ``run_dir``'s checkpoint if there is one).

    After every epoch: evaluate, append a metrics line, save the checkpoint. Returns the content of
    final.json (which the runner writes, atomically, as the run's very last step).
    """
    stages = method.stages()
    stage_index, epochs_done, n_records, elapsed = 0, 0, 0, 0.0
    checkpoint = read_checkpoint(run_dir, data.device, len(stages)) if run_dir.checkpoint.exists() else None
    metric_lines = _metric_lines(run_dir, checkpoint)
    if checkpoint is not None:
        stage_index, epochs_done = checkpoint["stage_index"], checkpoint["epochs_done"]
        n_records, elapsed = checkpoint["n_records"], checkpoint["elapsed"]
        method.begin_stage(stages[stage_index], data, resuming=True)
        try:
            method.load_state_dict(checkpoint["method"])
            _set_rng_state(checkpoint["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise _unreadable_checkpoint(run_dir, error) from None
        progress.message(f"resuming {run_dir.path} at stage {stages[stage_index].name}, epoch {epochs_done}")
        resumed_stage = stage_index
    else:
        resumed_stage = -1
    # Metric lines written after the checkpoint belong to an epoch that will be redone.
    records.truncate_jsonl(run_dir.metrics, n_records)
    digest = records.LinesDigest(metric_lines[:n_records])

    batch_size = int(method.hp["batch_size"])
    step = 0
    while stage_index < len(stages):
        stage = stages[stage_index]
        if stage_index != resumed_stage:
            method.begin_stage(stage, data, resuming=False)
        for epoch in range(epochs_done, stage.epochs):
            started = time.perf_counter()
            losses: dict[str, float] = {}
            n_steps = 0
            method.begin_epoch(stage, epoch)
            if stage.kind == "fit":
                fit_log = method.fit(stage, data)
            else:
                fit_log = {}
                order = method.epoch_indices(stage, epoch, data.n("train"), _epoch_generator(seed, stage_index, epoch))
                n_batches = (len(order) + batch_size - 1) // batch_size
                with progress.bar(n_batches, f"{stage.name} {epoch + 1}/{stage.epochs}") as bar:
                    augment_seed = augmentation_seed(seed, stage_index, epoch)
                    for chunk, x in data.iter_images("train", order, batch_size, train=True, seed=augment_seed):
                        chunk = chunk.to(data.device)
                        batch = Batch(
                            x=x,
                            y=data.labels("train")[chunk],
                            index=chunk,
                            group=data.groups("train")[chunk] if data.train_groups_allowed else None,
                            mask=data.spurious_masks("train", chunk) if data.masks_allowed else None,
                        )
                        step_losses = method.update(batch)
                        for key, value in step_losses.items():
                            if not np.isfinite(value):
                                raise NonFiniteLossError(
                                    f"{key} = {value} at stage {stage.name}, epoch {epoch + 1}, step {n_steps + 1}"
                                )
                            losses[key] = losses.get(key, 0.0) + value
                        n_steps += 1
                        step += 1
                        bar.update(1)
                        if n_steps % 10 == 0:
                            bar.set_postfix({k: f"{v / n_steps:.3f}" for k, v in losses.items()}, refresh=False)
            train_seconds = time.perf_counter() - started
            evaluation = evaluate(method, data)
            elapsed += time.perf_counter() - started
            record = {
                "stage": stage.name,
                "stage_index": stage_index,
                "epoch": epoch + 1,
                "selectable": stage.selectable,
                "train": {k: v / max(n_steps, 1) for k, v in losses.items()},
                "train_seconds": train_seconds,
                "elapsed_seconds": elapsed,
                "method": {**method.epoch_log(), **fit_log},
                "eval": evaluation,
            }
            digest.add(records.append_jsonl(run_dir.metrics, record))
            n_records += 1
            _print_epoch(progress, record, structure, method.primary)
            records.atomic_torch_save(
                run_dir.checkpoint,
                {
                    "stage_index": stage_index,
                    "epochs_done": epoch + 1,
                    "n_records": n_records,
                    "metrics_digest": digest.hexdigest(),
                    "elapsed": elapsed,
                    "method": method.state_dict(),
                    "rng": _rng_state(),
                },
            )
            if on_epoch_end is not None:
                on_epoch_end()
        stage_index += 1
        epochs_done = 0

    metric_records = run_dir.read_metrics()
    final = {
        "status": "done",
        "primary": method.primary,
        "average_kind": structure.average_kind,
        "n_evaluations": len(metric_records),
        "train_seconds_total": elapsed,
        "selection": summarize_run(metric_records, structure),
    }
    return final


CHECKPOINT_FIELDS = {"stage_index": int, "epochs_done": int, "n_records": int, "elapsed": float, "method": dict,
                     "rng": dict}


def _unreadable_checkpoint(run_dir: RunDir, error: BaseException) -> DataError:
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return DataError(f"{run_dir.checkpoint}: unreadable checkpoint ({type(error).__name__}: {reason}); "
                     "rerun with --force to restart the run from its first epoch")


def read_checkpoint(run_dir: RunDir, device: torch.device, n_stages: int) -> dict[str, Any]:
    """The run's checkpoint, checked to be one this trainer wrote; DataError saying it is unreadable and
    that ``--force`` restarts the run otherwise (an empty, truncated or foreign file)."""
    try:
        checkpoint = torch.load(run_dir.checkpoint, map_location=device, weights_only=False)
    except Exception as error:  # torch.load raises anything from EOFError to UnpicklingError on a bad file
        raise _unreadable_checkpoint(run_dir, error) from None
    if not isinstance(checkpoint, dict):
        raise _unreadable_checkpoint(run_dir, TypeError(f"holds a {type(checkpoint).__name__}, not a checkpoint"))
    for name, kind in CHECKPOINT_FIELDS.items():
        value = checkpoint.get(name)
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise _unreadable_checkpoint(run_dir, KeyError(f"no {kind.__name__} {name!r}"))
    if not 0 <= checkpoint["stage_index"] < n_stages or checkpoint["n_records"] < 0:
        raise _unreadable_checkpoint(run_dir, ValueError(f"stage {checkpoint['stage_index']} of {n_stages}"))
    return checkpoint


def _metric_lines(run_dir: RunDir, checkpoint: dict[str, Any] | None) -> list[str]:
    """The lines of metrics.jsonl, checked against the checkpoint: it must still hold every evaluation the
    checkpoint follows, as written (else DataError: resuming would leave a gap model selection never sees)."""
    try:
        lines = records.read_jsonl_lines(run_dir.metrics)
    except ValueError as error:
        raise DataError(f"{error}; rerun with --force to restart the run") from None
    if checkpoint is None:
        return lines
    expected = checkpoint["n_records"]
    if len(lines) < expected:
        raise DataError(f"{run_dir.metrics}: holds {len(lines)} evaluations but the checkpoint follows {expected} "
                        "(the file was deleted or truncated after it); the run cannot resume without them: "
                        "rerun with --force to restart it")
    recorded = checkpoint.get("metrics_digest")  # absent in checkpoints of older versions
    if recorded is not None and records.LinesDigest(lines[:expected]).hexdigest() != recorded:
        raise DataError(f"{run_dir.metrics}: its first {expected} evaluations are not those the checkpoint follows "
                        "(the file was edited or replaced); rerun with --force to restart the run")
    return lines


def _print_epoch(progress: Progress, record: dict[str, Any], structure: GroupStructure, primary: str) -> None:
    if progress.quiet:
        return
    parts = []
    for name, splits in record["eval"].items():
        val = summarize(splits["val"]["correct"], splits["val"]["total"], structure)
        label = "" if name == primary and len(record["eval"]) == 1 else f"{name} "
        parts.append(
            f"{label}val worst-group {100 * val['worst_group_accuracy']:.1f} avg {100 * val['average_accuracy']:.1f}"
        )
    losses = " ".join(f"{k} {v:.3f}" for k, v in record["train"].items())
    progress.message(f"{progress.label} {record['stage']} epoch {record['epoch']}: {losses} | " + " | ".join(parts))


def failure_record(error: BaseException) -> dict[str, Any]:
    return {
        "status": "failed",
        "error_type": type(error).__name__,
        "reason": str(error),
        "traceback": traceback.format_exc(),
        "time": time.time(),
    }
