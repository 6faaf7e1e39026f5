"""Linear probes (and an MLP head) of embeddings on a store's label modalities:
``terrasynth.probe.run_probes`` (see :mod:`terrasynth.evaluation.probe`)."""

from terrasynth.evaluation.probe import (
    FEATURE_SETS,
    HEADS,
    METRICS,
    LinearProbe,
    MLPProbe,
    ProbeRow,
    bootstrap,
    class_map_scores,
    fit_linear,
    fit_mlp,
    markdown,
    multilabel_scores,
    run_probes,
    write_probes,
)

__all__ = [
    "FEATURE_SETS",
    "HEADS",
    "METRICS",
    "LinearProbe",
    "MLPProbe",
    "ProbeRow",
    "bootstrap",
    "class_map_scores",
    "fit_linear",
    "fit_mlp",
    "markdown",
    "multilabel_scores",
    "run_probes",
    "write_probes",
]
