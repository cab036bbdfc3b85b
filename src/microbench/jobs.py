"""The Hydra jobs, one copy each: ``python src/<job>.py <overrides>`` in a checkout and ``python -m microbench <job>
<overrides>`` from any install both run :func:`run_job` (the argv checks of :func:`microbench.entry.start`, the job's
task from ``tasks.registry``, its summary lines). Above ``tasks/``: read only by the entry points."""

from __future__ import annotations

from microbench.entry import setup_console, start
from microbench.errors import exit_on_user_error
from microbench.resources import CONFIG_DIR

#: job -> the ``microbench.tasks.registry`` function that runs it (its config is ``configs/<job>.yaml``)
JOBS = {"eval": "evaluate", "train": "train", "forgetting": "forgetting", "specialists": "specialists"}


def run_job(job: str) -> None:
    """Run ``job`` on the overrides in ``sys.argv[1:]`` and print its summary; a user error is one line (exit 2)."""
    import hydra
    from omegaconf import DictConfig

    start(job)

    def app(cfg: DictConfig) -> None:
        setup_console()
        from microbench.results.report import summary
        from microbench.tasks import registry

        with exit_on_user_error():
            record, _ = getattr(registry, JOBS[job])(cfg)
        print("\n".join(summary(record)))

    app.__module__ = f"microbench.{job}"  # Hydra names the job after it: hydra.job.name, the run's <job>.log
    try:
        hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=f"{job}.yaml")(app)()
    finally:  # every rank of a trainer=ddp run (one process each) closes its process group before it exits
        from microbench.distributed import close_process_group

        close_process_group()
