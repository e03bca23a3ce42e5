"""The main job: build every variant from the public API, measure them, write a report.

``jaxopt-lab run`` is :func:`run_job` with :class:`JobSettings` from the command line.
``run_job`` and ``select_variants`` load on first use, so that the command line's
``--help`` never waits for JAX to import.
"""

from jaxopt_lab.app.report.settings import VARIANTS, JobSettings

__all__ = ("VARIANTS", "JobSettings", "run_job", "select_variants")


def __getattr__(name: str):
    if name in ("run_job", "select_variants"):
        from jaxopt_lab.app.report import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
