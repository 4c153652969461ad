"""Who runs the phase items: in this process, or a pool of Ray actors on a local Ray or a
cluster.

- ``executor.py`` ``LocalExecutor`` and ``RayExecutor`` (the ``PhaseWorker`` pool)
- ``local_ray.py`` ``ray_session`` and the lean local Ray start: the one module that touches
  Ray's private attributes, only on the Ray versions it was checked against
- ``ray_agent.py`` the stand-in dashboard agent of that local Ray

May import: lmforge.pipeline.prepare, ray
"""
