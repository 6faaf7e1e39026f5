"""Train the convolutional generator with settings its presets do not hold (design rounds).

    OMP_NUM_THREADS=1 python bench/train_conv_variant.py STORE RUN --steps 1786 \\
        --set '{"retrieval_mixture": true, "retrieval_exclusion_m": [600, 2560, 50000]}'

A preset of ``conv_generator`` (``--preset``, default ``tiny``) with the ``--set`` entries
(JSON, ModelConfig fields) laid over it, batch 24, seed ``--seed`` (default 0), the
learning rate decayed over ``--steps`` (or over ``--minutes`` with ``--schedule time``).
The run folder is an ordinary run: ``terrasynth calibrate``, ``evaluate`` and ``train
--resume`` take it. A setting that wins moves into the preset; this script is how it is
measured first (docs/design.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from terrasynth.atomic import write_marker
from terrasynth.evaluation.baselines import load_unet
from terrasynth.models.config import CONV_PRESETS
from terrasynth.training.score_objective import ROLE_SPLITS
from terrasynth.training.trainer import TrainConfig, Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("run", type=Path)
    ap.add_argument("--steps", type=int, default=1786)
    ap.add_argument("--minutes", type=float, default=0.0, help="time limit (0: none)")
    ap.add_argument("--schedule", choices=("steps", "time"), default="steps")
    ap.add_argument("--set", default="{}", help="JSON object of ModelConfig fields")
    ap.add_argument("--preset", choices=sorted(CONV_PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--roles",
        choices=ROLE_SPLITS,
        default="any",
        help="split of each chip's modalities (training/score_objective.py)",
    )
    ap.add_argument(
        "--init-unet",
        type=Path,
        help="a U-Net run or model folder whose weights start the trunk (with trunk 'unet')",
    )
    ap.add_argument(
        "--clip-parts",
        action="store_true",
        help="clip the trunk's gradient and the rest's apart (TrainConfig.grad_clip_parts)",
    )
    ap.add_argument(
        "--infill",
        type=float,
        default=None,
        help="share of generated rasters that keep some bands shown (default: the objective's)",
    )
    args = ap.parse_args()
    CONV_PRESETS[args.preset].update(json.loads(args.set))
    cfg = TrainConfig(
        preset=args.preset,
        backbone="conv_generator",
        steps=args.steps,
        batch_size=24,
        time_limit_min=args.minutes,
        schedule=args.schedule,
        seed=args.seed,
        roles=args.roles,
        grad_clip_parts=args.clip_parts,
    )
    args.run.mkdir(parents=True, exist_ok=True)
    write_marker(args.run, "train")
    trainer = Trainer(args.store, args.run, cfg)
    if args.infill is not None:
        trainer.objective.roles.p_infill = args.infill
    if args.init_unet is not None:
        init_trunk(trainer.model, args.init_unet)
    trainer.train(
        lambda r: (
            print(r["step"], round(r["loss"], 4), flush=True) if r["step"] % 100 == 0 else None
        )
    )
    print(f"done: {trainer.step} steps")


def init_trunk(model, folder: Path) -> None:
    """Start ``model``'s U-Net trunk (and its heads, with ``mean_heads: "unet"``) from the
    trained U-Net in ``folder``: the two-stage design, a regression mean first, the
    residual generator on top. The EMA copies the weights at its first update."""
    unet = load_unet(folder)
    trunk = model.unet_trunk
    if trunk is None:
        raise SystemExit("--init-unet needs trunk 'unet'")
    state = unet.state_dict()
    if not trunk.heads:  # the generator's own slot heads: the U-Net's are not used
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    trunk.load_state_dict(state)


if __name__ == "__main__":
    main()
