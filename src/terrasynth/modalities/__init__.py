"""Modality registry: the single table of modality facts."""

from terrasynth.modalities.registry import (
    BandGroup,
    LegendEntry,
    Modality,
    Registry,
    default_registry,
)

__all__ = ["BandGroup", "LegendEntry", "Modality", "Registry", "default_registry"]
