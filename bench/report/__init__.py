"""``bench report``: leaderboard tables (markdown, LaTeX, CSV, HTML) and plots from a results folder.

Modules, in the order data flows through them: :mod:`.evaluations` (the metrics of every
evaluation), :mod:`.load` (reading run folders), :mod:`.aggregate` (selection and summaries over
seeds: the one aggregator, used by ``bench run``'s table too), :mod:`.tables` (what is shown),
:mod:`.render` (markdown, LaTeX, CSV, HTML, files), :mod:`.plots`, :mod:`.cli`; for ``--published``,
:mod:`.published` (the published numbers and their sources, package data) and :mod:`.compare` (ours
beside them, cell by cell).

Everything is recomputed from the per-group correct/total counts in each run's ``metrics.jsonl``;
``final.json`` only marks a run as done (and tells how many evaluations it wrote), its summaries are
never read. The pipeline is a chain of pure functions:

1. :func:`.load.load_results`: walk the folder, read every run with plain :mod:`json`, count (and skip)
   failed, unfinished, corrupt and duplicate runs, and compute every metric of every evaluation of
   every predictor (one row per run x evaluation x predictor) with :mod:`bench.core.metrics` and
   :func:`bench.core.selection.rule_scores`, called once per dataset on all rows: the report has no
   formula of its own.
2. :func:`.aggregate.aggregate`: apply a selection rule. Within each run the rule picks an epoch per predictor
   (:func:`bench.core.selection.select`'s choice, made for all runs at once with
   :func:`bench.core.selection.best_per_group`); then, for each (method, dataset), the hyperparameter
   configuration whose primary predictor has the best mean over seeds of the rule's score at the
   picked epochs (see :data:`.aggregate.CONFIG_SCORE`); then mean, sample std (ddof=1) and n over the seeds of
   that configuration, the best method per column, and Welch's t-test against ERM on worst-group
   accuracy.
3. :mod:`.tables` and :mod:`.render` render the result; :mod:`.plots` draws it.

Multi-model methods (ULE: teacher + student, LfF: debiased + biased) are ranked by their primary
predictor. Each secondary predictor gets its own row, ``method (predictor)``, taken from the
configuration chosen for the primary (the models are trained together, so there is one
configuration) at its own selected epoch; such rows are shown for information, are never marked
best, and can be left out with ``--primary-only``.
"""
