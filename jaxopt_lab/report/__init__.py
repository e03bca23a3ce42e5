"""The main job: build every variant from the public API, measure them, write a report.

``jaxopt-lab run`` is :func:`run_job` with :class:`JobSettings` from the command line.
"""

from jaxopt_lab.report.job import run_job, select_variants
from jaxopt_lab.report.settings import VARIANTS, JobSettings

__all__ = ("VARIANTS", "JobSettings", "run_job", "select_variants")
