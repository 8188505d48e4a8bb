"""Long jobs as plain generators of :class:`Progress` records (no Qt, no napari).

Every dock, the CLI and the demo drive the same generators: iterate for progress, read the
return value for the result, close the generator to cancel.

Jobs (each module's docstring lists its stages and records):

- :func:`cluster_job` (``job="cluster"``) → ``ClusterResult``
- :func:`probe_job` (``job="probe"``) → :class:`ProbeResult`
- :func:`pathotune_job` (``job="pathotune"``) over a :class:`PathoTuneJob` → :class:`JobResult`
- :func:`distill_job` (``job="distill"``) → ``DistillResult``

The job modules import numpy, torch and the analyses on first use of a name.
"""

from napari_gpfm._lazy import lazy_exports

from .progress import Meter, Progress

_EXPORTS = {
    "cluster": ("cluster_job",),
    "probe": ("ProbeResult", "probe_job"),
    "pathotune": ("JobResult", "NotEnoughClassesError", "PathoTuneJob", "pathotune_job"),
    "distill": ("distill_job",),
}
_names, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["Meter", "Progress", *_names]
