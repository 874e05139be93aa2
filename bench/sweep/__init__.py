"""Sweeps: methods x datasets x hyperparameter draws x seeds, run locally or on SLURM; ``bench status``.

A sweep is planned, never stored as a to-do list: the plan is a pure function of the sweep's settings
(same flags -> same run folders), and every run's state is read from its run folder, the single source
of truth (bench.core.records). A rerun of the same sweep therefore launches only what is not finished.

Protocol. Hyperparameter draw ``i`` is seeded by ``i`` alone (methods.base.sample_hparams), so every seed
of a draw trains the same hyperparameters; draw 0 is the method's defaults. ``--stage all`` runs every
draw at every seed; ``--stage search`` runs the draws at ``--search-seeds`` seeds; ``--stage seeds`` picks,
per (method, dataset), the draw with the best mean validation score of the ``--select`` rule over its
finished search runs, and runs it at ``--seeds`` seeds (seed 0 is the search run itself, already done).

Files a sweep adds to a run folder (besides what bench.runner writes):

* ``submitted.json``: written by the launcher when it hands the run to SLURM or to a local process:
  launcher, job id, sweep id, log folder. While that job is alive, the run is *pending* and is not
  launched again.
* ``running.json``: the lock of a live training process: host, pid (and the process's start time, which
  catches pid reuse), SLURM job id, start and heartbeat times (refreshed every 30 s by a thread). It is
  taken under an ``flock`` of ``.lock`` and deleted when the process ends. A lock whose holder is gone
  (dead pid on the same host; a SLURM job that no longer runs; else a heartbeat older than 5 minutes)
  is stale and is taken over, which is how a killed or requeued run resumes (bench.run_lock).

Preemption and time limits: on SLURM the training job is a ``submitit.helpers.Checkpointable``. When
SLURM signals a time-out or a preemption, submitit calls its ``checkpoint()``, which resubmits the same
task; the requeued job finds the run's ``checkpoint.pt`` (written after every epoch) and resumes there
(bench.trainer.train). A run killed any other way resumes the same way when the sweep is rerun.

Logs of submitit go to ``<out>/.submitit/<sweep id>/``; the sweep's settings and planned run folders
to ``<out>/.sweeps/<sweep id>.json`` (written when launching, identical on every rerun), which is what
``bench status OUT`` reads.

Modules, each importing only those before it (data flows one way):

* ``settings``: a sweep file and/or flags -> :class:`SweepSpec` (what runs) and :class:`LaunchOptions` (how);
* ``state``: a run's state (:class:`RunState`), read from its folder and its job's state;
* ``plan``: the sweep's runs (:func:`plan`), and the best search draws of stage ``seeds``;
* ``jobs``: the job that trains one run under its lock (:class:`RunJob`, what submitit pickles);
* ``launchers``: the launchers by name (``local``, ``local-parallel``, ``slurm``), :func:`wait_for`;
* ``status``: the sweep's manifest and ``bench status``'s reports;
* ``cli``: ``bench sweep`` and ``bench status`` (``register``, see bench.cli.COMMAND_MODULES).

The run lock and the liveness of processes and SLURM jobs are bench.run_lock, outside the
package: they are not specific to sweeps.
Nothing is imported here, so that importing one module does not import them all.
"""
