"""``python -m syntagen_st.train --data PATH --out DIR [--config configs/protocol.yaml]``

Train DeepLabv3 on any dataset with the fixed protocol (or a shorter schedule):
``[--val-data PATH] [--steps N] [--arch A] [--crop-size S] [--batch-size B] [--logger wandb|csv|none]``.
Rerunning the same command resumes from DIR/checkpoints/last.ckpt. The final weights go to
DIR/model.safetensors with their sha256 in DIR/checksum.txt, the settings to
DIR/train_config.yaml; with validation data, the last evaluation goes to DIR/metrics.json.
"""

from __future__ import annotations

from collections.abc import Sequence

from .core.cli import check_out, config_from, config_parser, run_main
from .core.layout import TrainOutput
from .core.lock import exclusive

PROG = "syntagen_st.train"


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(
        f"python -m {PROG}", "Train DeepLabv3 on a dataset with the fixed protocol.", sections=("train",),
        shortcuts=("steps", "arch", "crop_size", "batch_size", "logger", "backbone_weights"), progress=True,
        images=True,
    )
    parser.add_argument("--data", required=True, help="a run, pool, VOC-style tree, or images/ + masks/ folder")
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--val-data", default=None, help="optional validation dataset (a VOC tree uses val.txt)")
    ns = parser.parse_args(argv)
    cfg = config_from(parser, ns)
    # The stages load torch, diffusers and Lightning: only once the flags and the config are good.
    from .scaleout.dist import training_world
    from .segmentation.data import find_samples
    from .segmentation.trainer import train
    training_world(cfg.train)  # a device count that cannot share the batch is refused before the folder exists
    out = TrainOutput(check_out(ns.out))
    # The datasets are read before the output folder (and its lock) is made.
    data = find_samples(ns.data, "train")
    val_data = find_samples(ns.val_data, "val") if ns.val_data is not None else None
    with exclusive(out.lock, str(out.root)):
        weights = train(cfg.train, data, out.root, val_data, seed=cfg.seed,
                        run_name=cfg.name if cfg.name != "run" else None, progress=not ns.no_progress)
    print(f"weights: {weights}\nsha256: {out.read_checksum()}")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
