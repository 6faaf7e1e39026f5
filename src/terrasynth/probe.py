"""Linear probes of embeddings on a store's label modalities: ``terrasynth.probe.run_probes``
(see :mod:`terrasynth.evaluation.probe`)."""

from terrasynth.evaluation.probe import (
    FEATURE_SETS,
    METRICS,
    LinearProbe,
    ProbeRow,
    bootstrap,
    class_map_scores,
    fit_linear,
    markdown,
    multilabel_scores,
    run_probes,
    write_probes,
)

__all__ = [
    "FEATURE_SETS",
    "METRICS",
    "LinearProbe",
    "ProbeRow",
    "bootstrap",
    "class_map_scores",
    "fit_linear",
    "markdown",
    "multilabel_scores",
    "run_probes",
    "write_probes",
]
