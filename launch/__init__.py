"""Everything that runs a job (``launch/``), one concern per subpackage.

- ``config/``   the run config: sections, typed YAML + overrides, the DeepSpeed JSON, the
  check of a config against a prepared dataset
- ``train/``    the per-rank worker, its wiring, the loop, callbacks, checkpoints, objectives
- ``tracking/`` MLflow, delivered from a background thread
- ``export/``   checkpoint → verified Hugging Face folder
- ``stages/``   every run as a stage graph (a plain config: one stage): the one runner of
  ``lmforge run`` and of every submitted job, launchers (local processes, srun, Ray Train), hooks,
  the MLflow run lifecycle
- ``submit/``   Slurm, Ray and local job submission, apart from the job body on the cluster
- ``commands.py`` the single ``lmforge`` commands (prepare, train, export, generate), ``cli.py``
  their command line, ``rundir.py`` the run directory's layout, ``generate.py`` text generation

Dependency direction: ``launch`` imports ``pipeline`` and ``model``, never the reverse; of the
pipeline, the contract and the loader, and the builder only through its one entry point.
May import: lmforge.pipeline.contract, lmforge.pipeline.config, lmforge.pipeline.durable,
    lmforge.pipeline.folder_lock, lmforge.pipeline.loader, lmforge.pipeline.prepare.driver,
    lmforge.model, torch, deepspeed, ray, mlflow, sentencepiece, tokenizers, transformers, peft,
    safetensors, webdataset
"""
