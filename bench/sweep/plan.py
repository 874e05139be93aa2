"""Planning a sweep: its runs, a pure function of its settings (same settings -> same run folders), in a
fixed order; and, for stage ``seeds``, the best draw of each (method, dataset) in the search stage. Loads
no data and trains nothing; the heavy registries (runner, methods, datasets) are imported when needed."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.core.errors import ConfigError, DataError
from bench.core.records import RunDir
from bench.core.selection import RULES
from bench.sweep.settings import SweepSpec
from bench.sweep.state import RunState, classify_runs


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: which (method, dataset, draw, seed), its request and its folder."""

    method: str
    dataset: str
    draw: int
    seed: int
    request: Any  # bench.runner.RunRequest (imported lazily: planning must stay cheap)
    run_dir: RunDir
    tuned: tuple[tuple[str, Any], ...] = ()  # the drawn hyperparameter values, for display

    def describe(self) -> str:
        values = " ".join(f"{k}={short_value(v)}" for k, v in self.tuned) if self.draw else "defaults"
        return f"{self.method} {self.dataset} draw {self.draw} seed {self.seed} ({values})"


def short_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _data_root(spec: SweepSpec, dataset: str) -> str | None:
    """The dataset's data root as an absolute path (jobs may start elsewhere); DataError when the
    dataset needs files that are not there, so a sweep does not submit hundreds of doomed jobs."""
    from datasets import get_dataset, resolve_data_root

    source = get_dataset(dataset)
    root = resolve_data_root(spec.data_root)
    if source.needs_data_root:
        if root is None:
            raise DataError(f"dataset {dataset!r} needs its files: pass --data-root DIR or set BENCH_DATA_ROOT"
                            + (f" ({source.obtain_hint})" if source.obtain_hint else ""))
        if source.locate(root) is None:
            raise DataError(f"dataset {dataset!r}: its files are not under {root}"
                            + (f" ({source.obtain_hint})" if source.obtain_hint else ""))
    return str(root.resolve()) if root is not None else None


def _runs_for(
    spec: SweepSpec, draws_by_pair: dict[tuple[str, str], list[int]], seeds: Sequence[int]
) -> list[PlannedRun]:
    from bench.runner import RunRequest, run_identity
    from methods import get_method
    from methods.base import hparam_specs

    out = str(Path(spec.out).expanduser().resolve())
    runs: list[PlannedRun] = []
    for dataset in spec.datasets:
        data_root = _data_root(spec, dataset)
        for method in spec.methods:
            tuned_names = [n for n, h in hparam_specs(get_method(method)).items() if h.search is not None]
            for draw in draws_by_pair[(method, dataset)]:
                request = RunRequest(
                    method=method, dataset=dataset, hparam_overrides=list(spec.hparam_overrides),
                    epochs=spec.epochs, backbone=spec.backbone, data_root=data_root,
                    dataset_options=dict(spec.data_options), weights=spec.weights, out=out, device=spec.device,
                    workers=spec.workers, draw=draw, deterministic=spec.deterministic, precision=spec.precision,
                    compile=spec.compile,
                )
                identity = run_identity(request)  # validates method, dataset, hparams; loads nothing
                tuned = tuple((n, identity["hparams"][n]) for n in tuned_names)
                for seed in seeds:
                    run_dir = RunDir.for_run(out, dataset, method, identity, seed)
                    runs.append(PlannedRun(method, dataset, draw, seed, request, run_dir, tuned))
    return runs


def plan(spec: SweepSpec, best: dict[tuple[str, str], tuple[int, float]] | None = None) -> list[PlannedRun]:
    """The sweep's runs, in a fixed order (dataset, method, draw, seed). Loads no data, trains nothing.
    Stage ``seeds`` reads the search runs' records (or takes ``best``, from :func:`best_draws`)."""
    pairs = [(m, d) for d in spec.datasets for m in spec.methods]
    if spec.stage == "all":
        return _runs_for(spec, {p: list(range(spec.n_hparams)) for p in pairs}, range(spec.seeds))
    if spec.stage == "search":
        return _runs_for(spec, {p: list(range(spec.n_hparams)) for p in pairs}, range(spec.search_seeds))
    best = best if best is not None else best_draws(spec)
    return _runs_for(spec, {p: [best[p][0]] for p in pairs}, range(spec.seeds))


def search_plan(spec: SweepSpec) -> list[PlannedRun]:
    return plan(replace(spec, stage="search"))


def validation_score(run_dir: RunDir, rule: str) -> float:
    """The rule's validation score of a finished run's primary model, at the evaluation the rule selects
    (bench.core.selection), recomputed from the run's records."""
    from bench.core.metrics import GroupStructure
    from bench.core.selection import select

    config = run_dir.read_config()
    structure = GroupStructure.from_info(config["dataset_info"])
    metric_records = run_dir.read_metrics()
    primary = config["primary"]
    index = select(metric_records, primary, structure, rule)
    counts = metric_records[index]["eval"][primary]["val"]
    score = RULES[rule][1]
    assert score is not None  # settings.SWEEP_RULES only holds rules with a score
    return float(score((counts["correct"], counts["total"]), structure))


def best_draws(spec: SweepSpec) -> dict[tuple[str, str], tuple[int, float]]:
    """Per (method, dataset): the draw with the best mean validation score over its finished search runs
    (ties: the lower draw), and that score. ConfigError while the search stage is not finished."""
    runs = search_plan(spec)
    statuses = classify_runs(runs)
    ended = (RunState.DONE, RunState.FAILED)
    unfinished = Counter((r.method, r.dataset) for r, s in zip(runs, statuses) if s.state not in ended)
    if unfinished:
        pairs = ", ".join(f"{m} on {d} ({n} runs)" for (m, d), n in sorted(unfinished.items()))
        raise ConfigError(f"--stage seeds needs the search stage finished; not yet: {pairs}. "
                          "Run the same command with --stage search, and check `bench status`")
    scores: dict[tuple[str, str], dict[int, list[float]]] = {}
    for run, status in zip(runs, statuses):
        per_draw = scores.setdefault((run.method, run.dataset), {})
        if status.state == RunState.DONE:
            value = validation_score(run.run_dir, spec.select)
            if not math.isnan(value):
                per_draw.setdefault(run.draw, []).append(value)
    best: dict[tuple[str, str], tuple[int, float]] = {}
    for pair, per_draw in scores.items():
        if not per_draw:
            raise ConfigError(f"every search run of {pair[0]} on {pair[1]} failed; see `bench status`")
        means = {draw: sum(v) / len(v) for draw, v in per_draw.items()}
        draw = max(sorted(means), key=lambda d: means[d])  # sorted + max: the lowest draw wins ties
        best[pair] = (draw, means[draw])
    return best
