"""Build or load any model from its config: the ``backbone`` field names the class."""

from __future__ import annotations

from pathlib import Path

from terrasynth.errors import TerrasynthError
from terrasynth.models.base import CONFIG, WEIGHTS, GenerativeModel
from terrasynth.models.config import ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.scene_model import SceneModel
from terrasynth.models.unet import UNet

MODEL_CLASSES = {"scene_transformer": SceneModel, "conv_generator": ConvGenerator, "unet": UNet}


def build_model(config: ModelConfig) -> GenerativeModel:
    """A freshly initialised model of the config's backbone."""
    config.validate()
    return MODEL_CLASSES[config.backbone](config)


def load_model(folder: str | Path, map_location: str = "cpu") -> GenerativeModel:
    """The model saved in ``folder`` (``config.json`` + ``model.safetensors``).

    A U-Net folder saved before the U-Net was a backbone (its config has no ``backbone``)
    loads as a ``"unet"`` model: :meth:`ModelConfig.from_dict` reads the old config, and the
    weights keep their names."""
    folder = Path(folder)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise TerrasynthError(f"{folder}: no {CONFIG} and {WEIGHTS} here")
    config = ModelConfig.load(folder / CONFIG)
    if config.backbone not in MODEL_CLASSES:
        raise TerrasynthError(f"{folder}: unknown backbone '{config.backbone}'")
    return MODEL_CLASSES[config.backbone].from_pretrained(folder, map_location=map_location)


def model_folder(path: str | Path | None) -> Path:
    """The model folder of ``path``: itself, a run folder's ``model/``, or (None) the
    built-in model."""
    if path is None:
        from terrasynth.pipeline import default_model_path

        return default_model_path()
    folder = Path(path)
    if (folder / "model" / CONFIG).exists():
        folder = folder / "model"
    if not (folder / CONFIG).exists():
        raise TerrasynthError(f"{folder}: not a model folder (no {CONFIG})")
    return folder
