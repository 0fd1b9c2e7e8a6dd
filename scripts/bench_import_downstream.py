"""Does a refined import train a better model? Labels and the downstream model, per import setting.

    python scripts/bench_import_downstream.py                     # the table in docs/masks.md (~35 CPU minutes)
    python scripts/bench_import_downstream.py --arms given,crf --seeds 0 --steps 300   # a quick look

Each arm is one way of labelling the same rich noisy shapes (scripts/noisy_shapes.py, 600 images of
64 px, harsh, look 0, seed 0): the labels as given, the truth itself (the ceiling), or the import's
refinement by the image alone (``core/guided.refine_label``) at a setting of ``ARMS``. For each, the
label mIoU against the truth (255 counted as a miss) and coverage, then one LR-ASPP model from
scratch per ``--seeds`` seed (``--steps`` steps, batch 16, as ``bench_refine.py``'s arms) scored on
200 clean held-out images: the mean, each seed, per-class IoU, and the predicted over true pixels
per class (under 1: the model under-segments it). No relabel and no filter: ``bench_refine.py``
measures the loop. Not a test: the figures depend on the seed and the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisy_shapes import SCENES, label_quality, make_dataset, make_look, scene_noise, write_dataset  # noqa: E402

from syntagen_st.core.classes import VOC_CLASSES  # noqa: E402
from syntagen_st.core.cli import load_config_file  # noqa: E402
from syntagen_st.core.config import LabelConfig  # noqa: E402
from syntagen_st.core.guided import refine_label  # noqa: E402
from syntagen_st.segmentation.data import find_samples  # noqa: E402
from syntagen_st.segmentation.evaluate import evaluate  # noqa: E402
from syntagen_st.segmentation.metrics import iou_from_confusion  # noqa: E402
from syntagen_st.segmentation.network import load_model  # noqa: E402
from syntagen_st.segmentation.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARMS: dict[str, dict | None] = {
    "given": None,
    "truth": None,
    "crf": {},  # the shipped import: the colour model, the dense CRF and the doubt rule
    "crf-no-colour": {"colour_weight": 0.0},
    "crf-no-doubt": {"colour_weight": 0.0, "prior_doubt": False},
    "guided": {"prior_method": "guided", "colour_weight": 0.0},  # the import before the CRF: three guided passes
}


def labels_of(arm: str, data: dict) -> np.ndarray:
    if arm == "given":
        return data["masks"]
    if arm == "truth":
        return data["gt"]
    cfg = dataclasses.replace(LabelConfig(), **ARMS[arm])
    return np.stack([refine_label(i, m, c, cfg)[1].numpy() for i, m, c in
                     zip(data["images"], data["masks"], data["classes"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--level", default="harsh")
    parser.add_argument("--look", type=int, default=0)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="the data's seed (the held-out set uses seed + 1)")
    parser.add_argument("--seeds", default="0,1,2", help="the models' seeds")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--work", default=None, help="folder for the data and models (default: a temporary one)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    if not set(arms) <= set(ARMS):
        parser.error(f"--arms: choose from {', '.join(ARMS)}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(random weights|LeafSpec|worker)")
    noise, look, scene = scene_noise(args.level, "rich"), make_look(args.look), SCENES["rich"]
    data = make_dataset(args.n, 64, args.seed, noise, look, scene)
    held = make_dataset(200, 64, args.seed + 1, noise, look, scene)
    cfg = dataclasses.replace(load_config_file(str(REPO / "configs" / "smoke.yaml")).train,
                              arch="lraspp_mobilenet_v3_large", backbone_weights="none", crop_size=64, batch_size=16,
                              lr=0.02, logger="none", max_steps=args.steps, checkpoint_every=args.steps)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_import_downstream_") as tmp:
        root = Path(args.work or tmp)
        write_dataset(root / "held", held | {"masks": held["gt"]})
        held_samples = find_samples(root / "held")
        for arm in arms:
            labels = labels_of(arm, data)
            q = label_quality(labels, data["gt"])
            write_dataset(root / arm, data | {"masks": labels})
            scores, confusion = [], 0
            for seed in seeds:
                weights = train(cfg, find_samples(root / arm), root / f"model_{arm}_{seed}", seed=seed,
                                run_name=f"bench-{arm}", progress=False)
                metrics = evaluate(load_model(weights), held_samples, "cpu")
                scores.append(metrics["mIoU"])
                confusion = confusion + np.array(metrics["confusion_matrix"])
                print(f"  {arm}, seed {seed}: held-out mIoU {scores[-1]:.3f}", flush=True)
            present = np.flatnonzero(confusion.sum(1))
            iou = iou_from_confusion(torch.from_numpy(confusion)).numpy()
            ratio = confusion.sum(0)[present] / confusion.sum(1)[present]
            per_class = ", ".join(f"{VOC_CLASSES[c]} {iou[c]:.2f} ({r:.2f})" for c, r in zip(present, ratio))
            rows.append(f"| {arm} | {q['miou']:.3f} | {q['coverage']:.3f} | {' / '.join(f'{s:.3f}' for s in scores)} "
                        f"| {np.mean(scores):.3f} | {per_class} |")
            print(rows[-1], flush=True)
    print(f"\n{args.level}, look {args.look}, {args.n} images, {args.steps} steps, seeds {args.seeds}")
    print("| labels | label mIoU (255 a miss) | coverage | model per seed | mean | model per class, IoU "
          "(predicted / true pixels), over the seeds |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
