"""Every run is a stage graph: its plan, the one runner, launchers and hooks.

- ``graph.py`` the stages of a config (a config without ``stages:`` is a graph of one stage in
  the run directory itself), their results, and what the user sees of them
- ``runner.py`` the one runner (``lmforge run``, ``lmforge submit local|slurm|ray`` jobs):
  prepare → train → export → hooks → ``STAGE_COMPLETE`` per stage
- ``launchers.py`` what starts a stage's training processes: local processes, srun, Ray Train
- ``callback.py``, ``hooks.py``, ``builtin_hooks.py`` the hook API: the typed
  ``StageCallback`` and ``StageContext``, loading ``hooks:`` by import path, the built-ins
  ``export``, ``register``, ``submit_next``
- ``mix_draws.py`` the ``data.mix`` draws of each stage: planned (``--dry-run``) and counted
  after training
- ``mlflow_runs.py`` the job's MLflow runs (parent, child per stage, start, end) and the one
  rule from exit status to MLflow status

May import: lmforge.launch.commands, lmforge.launch.config, lmforge.launch.rundir,
    lmforge.launch.redact, lmforge.launch.tracking, lmforge.launch.train, lmforge.launch.eval,
    lmforge.pipeline.folder_lock, lmforge.pipeline.contract, lmforge.pipeline.loader, mlflow,
    ray.
Never imports lmforge.launch.submit (the submit side calls the runner, not the reverse;
``RayTrainJob`` only for type checking).
"""
