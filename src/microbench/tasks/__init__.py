"""The task layer: the only package that reads a Hydra config. Each task builds what its config names, runs, and
returns ``(RunRecord, objects)``; :mod:`microbench.tasks.registry` maps (task, model family) to the task function.
Nothing below this package imports it (``tests/test_architecture.py``)."""
