"""Where models run: ``cpu`` (the default), ``cuda``, ``cuda:N``, ``mps`` or ``auto``.

:func:`resolve_device` turns a name into a ``torch.device`` that is really there, or
refuses it with one line. Random draws stay on the CPU (one stream on any device), so a
seed gives the same noise wherever the model runs; results come back to the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass, replace
from typing import Any

import torch

from terrasynth.errors import TerrasynthError

DEVICE_NAMES = "cpu, cuda, cuda:N, mps or auto"


def resolve_device(name: str | torch.device) -> torch.device:
    """The device ``name`` selects: ``auto`` is the first GPU (CUDA, then Apple MPS) if one
    is available, else the CPU. A device that is not available raises
    :class:`TerrasynthError` saying so."""
    if isinstance(name, torch.device):
        name = str(name)
    text = name.strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise TerrasynthError(
                "device 'mps': no Apple MPS device is available (use --device cpu)"
            )
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise TerrasynthError(f"device must be {DEVICE_NAMES}, not '{name}'")
    if not torch.cuda.is_available():
        why = "" if torch.version.cuda else " (this PyTorch build has no CUDA support)"
        raise TerrasynthError(
            f"device '{name}': no CUDA device is available{why}; use --device cpu"
        )
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise TerrasynthError(
            f"device '{name}': there are {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model with none)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (in dicts, lists, tuples and dataclasses) on
    ``device``; anything else unchanged."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple) and not isinstance(value, str):
        items = [to_device(v, device) for v in value]
        return type(value)(items) if isinstance(value, list) else tuple(items)
    if is_dataclass(value) and not isinstance(value, type):
        moved = {f.name: to_device(getattr(value, f.name), device) for f in fields(value) if f.init}
        return replace(value, **moved)
    return value


__all__: Sequence[str] = ["DEVICE_NAMES", "model_device", "resolve_device", "to_device"]
