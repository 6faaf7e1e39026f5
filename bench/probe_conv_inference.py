"""Probe a trained convolutional generator by changing one thing at inference time.

    python bench/probe_conv_inference.py MODEL STORE OUT --gate 0.95
    python bench/probe_conv_inference.py MODEL STORE OUT --missing-penalty 1000
    python bench/probe_conv_inference.py MODEL STORE OUT --head-level 0
    python bench/probe_conv_inference.py MODEL STORE OUT --head 0
    python bench/probe_conv_inference.py MODEL STORE OUT --amplitude

Copies MODEL (a ``model`` folder of a ``conv_generator`` run with the retrieval mixture) to
``OUT/model``, applies the change, calibrates it on the validation split and scores it on
the frozen 9-direction protocol (``OUT/report``; no baselines: compare with the report of
the unchanged model). A design round asks "would the model be better if this part did X?"
before paying an hour of training for the answer (docs/design.md, issue 17, fourth round):

* ``--gate S``: every sample carries the share S of its neighbour's deviation (the learned
  gate replaced by a constant);
* ``--missing-penalty X``: a training chip lacking a given modality counts X as its
  distance for it (``retrieval.MISSING_PENALTY``, 2 by default);
* ``--head-level S``: keep the share S of the mean head's chip mean (the level then comes
  from the neighbours alone at S = 0; the structure within the chip stays);
* ``--head S``: scale the whole mean head's output by S;
* ``--amplitude``: switch on ``retrieval_amplitude`` (needs no new weights); with
  ``--amplitude-max M``, the neighbours' roughness scales the structure by at most M
  (the config's ``retrieval_amplitude_max``, 3 by default; 1: only ever flatten).

The changes patch methods of this process only; nothing in the package changes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

import terrasynth.models.retrieval as retrieval
from terrasynth.cli.main import app
from terrasynth.models.conv_generator import ConvGenerator

PROTOCOL = Path(__file__).parent / "protocols" / "issue17_9directions_8samples.json"


def patch_head(head: float, head_level: float) -> None:
    """Scale the mean head's output (``head``) and its chip mean (``head_level``) before
    the neighbours' level is added."""
    original = ConvGenerator._add_retrieved

    def add_retrieved(self, mod, mu, ret, near=None, spread=None):
        if mod.kind != "categorical":
            mu = {g: head * v for g, v in mu.items()}
            mu = {g: v - (1 - head_level) * v.mean((2, 3), keepdim=True) for g, v in mu.items()}
        return original(self, mod, mu, ret, near, spread)

    ConvGenerator._add_retrieved = add_retrieved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("store", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gate", type=float)
    ap.add_argument("--missing-penalty", type=float)
    ap.add_argument("--head-level", type=float, default=1.0)
    ap.add_argument("--head", type=float, default=1.0)
    ap.add_argument("--amplitude", action="store_true")
    ap.add_argument("--amplitude-max", type=float)
    args = ap.parse_args()
    model = args.out / "model"
    args.out.mkdir(parents=True, exist_ok=False)
    shutil.copytree(args.model, model)
    config = json.loads((model / "config.json").read_text())
    config["spread_scale"] = {}  # calibrated again below, for the changed model
    config["retrieval_amplitude"] = args.amplitude or config.get("retrieval_amplitude", False)
    if args.amplitude_max is not None:
        config["retrieval_amplitude_max"] = args.amplitude_max
    (model / "config.json").write_text(json.dumps(config, indent=2))
    if args.gate is not None:
        weights = load_file(model / "model.safetensors")
        weights["level_gate.weight"].zero_()
        weights["level_gate.bias"].fill_(math.log(args.gate / (1 - args.gate)))
        save_file(weights, model / "model.safetensors")
    if args.missing_penalty is not None:
        retrieval.MISSING_PENALTY = args.missing_penalty
    if args.head != 1.0 or args.head_level != 1.0:
        patch_head(args.head, args.head_level)
    store, report = str(args.store), str(args.out / "report")
    for argv in (
        ["calibrate", "-m", str(model), "-d", store],
        ["evaluate", "-m", str(model), "-d", store, "-o", report, "--protocol", str(PROTOCOL)],
    ):
        app(argv, standalone_mode=False)


if __name__ == "__main__":
    main()
