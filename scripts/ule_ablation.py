"""The ULE ablation behind docs/ule.md: variants of the penalty, its weight and the warm-up, against ERM.

Every run goes through the harness's own runner (bench.runner), so each one is an ordinary run
folder under ``--out`` (finished runs are reused, not retrained), selected with the same rule as
``bench run`` (best validation worst-group accuracy by default). The table reports, per dataset and
variant, mean ± sample std over seeds (n) of: the validation worst-group accuracy at the selected
epoch (what the defaults are chosen on), and the test worst-group / average accuracy of the teacher
and of the student at their selected epochs. Test numbers are reported, never used to choose.

Examples::

    python scripts/ule_ablation.py --datasets waterbirds-synth --variants erm default loss-mse --seeds 2
    python scripts/ule_ablation.py --datasets urbancars-synth waterbirds-synth --variants all --seeds 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.core.metrics import GroupStructure, predicts_one_class  # noqa: E402
from bench.core.selection import DEFAULT_RULE, RULES  # noqa: E402
from bench.runner import RunRequest, execute, prepare  # noqa: E402
from bench.trainer import summarize_run  # noqa: E402
from datasets import load_dataset  # noqa: E402

# name -> (method, hparam overrides). "default" is ULE as declared in methods/ule.py (with the
# dataset's dataset_defaults applied); every other variant overrides the knobs it names and resets
# the others to the class defaults, so that a variant means the same thing on every dataset.
# RAW_LOGIT: the reconstruction of ule.md §2.3 as first implemented (the raw true-class logit); the
# centred variants below differ from it in grad_target only.
RAW_LOGIT = {"grad_target": "logit_true", "grad_norm": "maxabs", "distance": "mse", "penalty_weight": 1.0,
             "warmup_epochs": 0, "penalty_epochs": 0, "freeze_student_after": 0, "reading": "saliency"}


def _variant(**changes: Any) -> tuple[str, dict[str, Any]]:
    return "ule", {**RAW_LOGIT, **changes}


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "erm": ("erm", {}),
    "default": ("ule", {}),
    "rawlogit": _variant(),
    "lambda0": _variant(penalty_weight=0.0),
    "rawlogit-l0.1": _variant(penalty_weight=0.1),
    "rawlogit-l10": _variant(penalty_weight=10.0),
    "rawlogit-cosine": _variant(distance="cosine"),
    "rawlogit-orthogonal": _variant(distance="orthogonal"),
    "rawlogit-l2": _variant(grad_norm="l2"),
    "rawlogit-warmup2": _variant(warmup_epochs=2),
    "logit_pred-mse": _variant(grad_target="logit_pred"),
    "loss-mse": _variant(grad_target="loss"),
    "loss-mse-l0.1": _variant(grad_target="loss", penalty_weight=0.1),
    "loss-mse-l10": _variant(grad_target="loss", penalty_weight=10.0),
    "loss-cosine": _variant(grad_target="loss", distance="cosine"),
    "loss-cosine-l10": _variant(grad_target="loss", distance="cosine", penalty_weight=10.0),
    "loss-orthogonal": _variant(grad_target="loss", distance="orthogonal"),
    "loss-orthogonal-l10": _variant(grad_target="loss", distance="orthogonal", penalty_weight=10.0),
    "loss-orthogonal-l30": _variant(grad_target="loss", distance="orthogonal", penalty_weight=30.0),
    "loss-orthogonal-warmup2": _variant(grad_target="loss", distance="orthogonal", warmup_epochs=2),
    "loss-mse-warmup2": _variant(grad_target="loss", warmup_epochs=2),
    # The true-class logit minus the mean logit: the default's reading without its common-mode
    # loophole (docs/ule.md, "Ablation").
    "centred-mse": _variant(grad_target="logit_centred"),
    "centred-mse-l10": _variant(grad_target="logit_centred", penalty_weight=10.0),
    "centred-mse-l30": _variant(grad_target="logit_centred", penalty_weight=30.0),
    "centred-cosine": _variant(grad_target="logit_centred", distance="cosine"),
    "centred-orthogonal": _variant(grad_target="logit_centred", distance="orthogonal"),
    "centred-orthogonal-l10": _variant(grad_target="logit_centred", distance="orthogonal", penalty_weight=10.0),
    "centred-mse-warmup2": _variant(grad_target="logit_centred", warmup_epochs=2),
    # Second round (docs/ule.md): the collapse's fixes, then the readings not tried before, each from the
    # first-round default (centred-mse) with the knobs it names.
    "centred-mse-warmup1": _variant(grad_target="logit_centred", warmup_epochs=1),
    "shared-scale": _variant(grad_target="logit_centred", grad_norm="student_maxabs"),
    "shared-scale-l0.3": _variant(grad_target="logit_centred", grad_norm="student_maxabs", penalty_weight=0.3),
    "shared-scale-l3": _variant(grad_target="logit_centred", grad_norm="student_maxabs", penalty_weight=3.0),
    "shared-scale-l10": _variant(grad_target="logit_centred", grad_norm="student_maxabs", penalty_weight=10.0),
    "shared-scale-warmup1": _variant(grad_target="logit_centred", grad_norm="student_maxabs", warmup_epochs=1),
    "probability-1e3": _variant(grad_target="prob_true", grad_norm="none", penalty_weight=1e3),
    "probability-1e4": _variant(grad_target="prob_true", grad_norm="none", penalty_weight=1e4),
    "probability-1e5": _variant(grad_target="prob_true", grad_norm="none", penalty_weight=1e5),
    "finite-0.03": _variant(reading="finite_step", step_size=0.03),
    "finite-0.1": _variant(reading="finite_step", step_size=0.1),
    "finite-0.3": _variant(reading="finite_step", step_size=0.3),
    "finite-l2-0.1": _variant(reading="finite_step", step_size=0.1, step_direction="l2"),
    "shared-scale-first2": _variant(grad_target="logit_centred", grad_norm="student_maxabs", penalty_epochs=2),
    "shared-scale-frozen1": _variant(grad_target="logit_centred", grad_norm="student_maxabs", freeze_student_after=1),
    "shared-scale-frozen2": _variant(grad_target="logit_centred", grad_norm="student_maxabs", freeze_student_after=2),
    "finite-0.1-frozen1": _variant(reading="finite_step", step_size=0.1, freeze_student_after=1),
    # The oracle of the discriminating experiment: rrr with the twins' true spurious-region masks.
    **{f"rrr-{weight:g}": ("rrr", {"penalty_weight": weight}) for weight in (10.0, 100.0, 1000.0, 10000.0)},
}


def _mean_std(values: list[float]) -> str:
    array = 100 * np.asarray(values, dtype=float)
    if len(array) == 0:
        return "-"
    std = array.std(ddof=1) if len(array) > 1 else 0.0
    return f"{array.mean():.1f} ± {std:.1f}"


def run_variant(
    dataset: str, variant: str, seeds: list[int], epochs: int | None, out: str, rule: str,
    first_epochs: int | None = None, device: str = "cpu", train: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) every seed of a variant; with ``first_epochs``, select among the first E
    evaluations only: without a schedule, they are exactly those of a run of E epochs. With
    ``train=False`` only the seeds already finished are reported."""
    method, overrides = VARIANTS[variant]
    request = RunRequest(method=method, dataset=dataset, epochs=epochs, out=out,
                         device=device, hparam_overrides=[f"{k}={v}" for k, v in overrides.items()])
    prepared = prepare(request)
    primary = "teacher" if method == "ule" else "model"
    rows: dict[str, list[float]] = {}
    seconds: list[float] = []
    if not train:
        seeds = [seed for seed in seeds if prepared.run_dir(seed).is_done()]
    for seed in seeds:
        started = time.perf_counter()
        final = execute(prepared, seed, quiet=True)
        if final.get("status") != "done":
            raise RuntimeError(f"{dataset} {variant} seed {seed}: {final.get('error_type')}: {final.get('reason')}")
        if not final.get("skipped"):
            seconds.append(time.perf_counter() - started)
        selection = final["selection"][rule]
        run_dir = prepared.run_dir(seed)
        structure = GroupStructure.from_info(run_dir.read_config()["dataset_info"])
        metric_records = run_dir.read_metrics()
        if first_epochs is not None:
            metric_records = metric_records[:first_epochs]
            selection = summarize_run(metric_records, structure, [rule])[rule]
        # A main model that predicted one class in every evaluation (the collapse bench run warns about).
        collapsed = all(predicts_one_class(r["eval"][primary]["val"]["correct"], r["eval"][primary]["val"]["total"],
                                           structure) for r in metric_records if r.get("selectable", True))
        rows.setdefault("collapsed", []).append(float(collapsed))
        for predictor, chosen in selection.items():
            prefix = "main" if predictor == primary else predictor
            rows.setdefault(f"{prefix}_val_wga", []).append(chosen["val"]["worst_group_accuracy"])
            rows.setdefault(f"{prefix}_test_wga", []).append(chosen["test"]["worst_group_accuracy"])
            rows.setdefault(f"{prefix}_test_avg", []).append(chosen["test"]["average_accuracy"])
    return {"rows": rows, "n": len(seeds), "seconds": seconds, "hparams": prepared.hparams}


def common_mode_report(run_dir: Path, n_examples: int = 512) -> str:
    """Why ``grad_target=logit_true`` can fail: softmax ignores a term added to every logit.

    Loads a finished ULE run's checkpoint and compares, on training examples, the input gradients of
    the teacher and the student for three scalars: the true-class logit (what the default penalty
    sees), the margin z_y - max_{k != y} z_k (what the predictions depend on) and the sum of the
    logits (the common mode, invisible to the softmax). A teacher that meets the penalty through
    the common mode has a negative true-logit cosine but a positive margin cosine (it still uses
    what the student uses), and a common-mode gradient much larger than the student's.
    """
    import torch
    import torch.nn.functional as F

    from bench.core.backbones import build_backbone, get_backbone
    from bench.core.device_data import DeviceData
    from bench.core.records import RunDir

    run = RunDir(run_dir)
    config = run.read_config()
    checkpoint = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
    dataset = load_dataset(config["dataset"], None, config["dataset_options"])
    hparams = config["hparams"]
    data = DeviceData(dataset, torch.device("cpu"), train_groups_allowed=False,
                      normalisation=get_backbone(hparams["backbone"]).input.normalisation)
    models = {}
    for name in ("student", "teacher"):
        model = build_backbone(hparams["backbone"], dataset.n_classes, dataset.image_shape[0])
        model.load_state_dict(checkpoint["method"][name])
        models[name] = model.train()
    indices = torch.linspace(0, data.n("train") - 1, n_examples).long()
    x, y = data.images("train", indices, train=False), data.labels("train")[indices]

    def gradient(model: torch.nn.Module, kind: str) -> torch.Tensor:
        leaf = x.clone().requires_grad_(True)
        logits = model(leaf)
        true = logits.gather(1, y[:, None])[:, 0]
        if kind == "true logit":
            scalar = true.sum()
        elif kind == "margin":
            others = logits.scatter(1, y[:, None], float("-inf"))
            scalar = (true - others.amax(dim=1)).sum()
        else:
            scalar = logits.sum()
        return torch.autograd.grad(scalar, leaf)[0].flatten(1)

    knobs = ", ".join(f"{k}={hparams[k]}" for k in ("grad_target", "grad_norm", "distance", "penalty_weight"))
    lines = [f"{run_dir} ({config['dataset']}, {knobs}, epochs done {checkpoint['epochs_done']}):",
             "| scalar | cos(g_T, g_S) | mean norm g_T | mean norm g_S |", "|---|---|---|---|"]
    for kind in ("true logit", "margin", "sum of logits (common mode)"):
        teacher, student = gradient(models["teacher"], kind), gradient(models["student"], kind)
        cosine = F.cosine_similarity(teacher, student, dim=1).mean().item()
        norms = f"{teacher.norm(dim=1).mean():.3g} | {student.norm(dim=1).mean():.3g}"
        lines.append(f"| {kind} | {cosine:+.2f} | {norms} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+")
    parser.add_argument("--common-mode", nargs="+", type=Path, metavar="RUN_DIR",
                        help="instead of training: the common-mode diagnosis of finished ULE runs (seed folders)")
    parser.add_argument("--variants", nargs="+", default=["all"], help=f"any of: all {' '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the epochs of every run (default: resolved defaults)")
    parser.add_argument("--out", default="results/ule-ablation")
    parser.add_argument("--select", default=DEFAULT_RULE, choices=[r for r in RULES if r != "oracle-test"])
    parser.add_argument("--first-epochs", type=int, help="report as if each run had only its first E epochs")
    parser.add_argument("--device", default="cpu", help="cpu (default: the numbers in docs/ule.md), cuda, auto")
    parser.add_argument("--no-train", action="store_true", help="only report the seeds already finished")
    args = parser.parse_args(argv)
    if args.common_mode:
        for run_dir in args.common_mode:
            print(common_mode_report(run_dir) + "\n")
        return 0
    if not args.datasets:
        parser.error("--datasets is required (or --common-mode)")
    variants = list(VARIANTS) if args.variants == ["all"] else args.variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    header = ("| dataset | variant | n | collapsed | main val WGA | main test WGA | main test avg | student test WGA "
              "| student test avg | s/run |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for dataset in args.datasets:
        print(f"{dataset}: runs in {args.out} (a run's identity covers the twin's data)", flush=True)
        for variant in variants:
            result = run_variant(dataset, variant, seeds, args.epochs, args.out, args.select, args.first_epochs,
                                 args.device, train=not args.no_train)
            rows = result["rows"]
            seconds = f"{np.median(result['seconds']):.0f}" if result["seconds"] else "cached"
            collapsed = int(sum(rows.get("collapsed", [])))
            line = (f"| {dataset} | {variant} | {result['n']} | {collapsed} "
                    f"| {_mean_std(rows.get('main_val_wga', []))} "
                    f"| {_mean_std(rows.get('main_test_wga', []))} | {_mean_std(rows.get('main_test_avg', []))} "
                    f"| {_mean_std(rows.get('student_test_wga', []))} | {_mean_std(rows.get('student_test_avg', []))} "
                    f"| {seconds} |")
            lines.append(line)
            print(line, flush=True)
    print()
    print("\n".join(lines))
    print(f"\nmain = ULE's teacher (ERM's model for erm); WGA = worst-group accuracy, selection rule {args.select}"
          + (f" among the first {args.first_epochs} epochs" if args.first_epochs else "")
          + f"; mean ± sample std over seeds {seeds[0]}..{seeds[-1]}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
