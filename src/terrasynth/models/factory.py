"""Build or load any model from its config: the ``backbone`` field names the class."""

from __future__ import annotations

from pathlib import Path

from terrasynth.errors import TerrasynthError
from terrasynth.models.base import CONFIG, WEIGHTS, GenerativeModel
from terrasynth.models.config import ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.scene_model import SceneModel

MODEL_CLASSES = {"scene_transformer": SceneModel, "conv_generator": ConvGenerator}


def build_model(config: ModelConfig) -> GenerativeModel:
    """A freshly initialised model of the config's backbone."""
    config.validate()
    return MODEL_CLASSES[config.backbone](config)


def load_model(folder: str | Path, map_location: str = "cpu") -> GenerativeModel:
    """The model saved in ``folder`` (``config.json`` + ``model.safetensors``)."""
    folder = Path(folder)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise TerrasynthError(f"{folder}: no {CONFIG} and {WEIGHTS} here")
    config = ModelConfig.load(folder / CONFIG)
    if config.backbone not in MODEL_CLASSES:
        raise TerrasynthError(f"{folder}: unknown backbone '{config.backbone}'")
    return MODEL_CLASSES[config.backbone].from_pretrained(folder, map_location=map_location)
