"""Image-guided label refinement by the image alone: label gain and CPU cost per image, on shapes.

    python scripts/bench_guided.py --n 8 --size 512                 # the table in docs/masks.md
    python scripts/bench_guided.py --n 8 --candidates guided,densecrf --threads 1
    python scripts/bench_guided.py --n 8 --size 512 --scene rich    # textures, decoys, thin parts, bleeding labels

Each noisy label (scripts/noisy_shapes.py) becomes a prior (``label.prior_confidence`` on its
class, uniform on 255, over background plus the classes the sample names) and is refined by
each candidate with the image alone; the label is the argmax (full coverage), so every
candidate is compared on the same footing. ``prior`` is that argmax without the image (255 ->
the first allowed class, background). The shipped import's label with its 255 band
(``refine_label``: the CRF and the doubt rule) is reported too. Label mIoU is against the truth
with 255 counted as a miss; the worst per-class change shows what a clean label can lose.

``guided`` is the guided filter at generation's window; ``densecrf`` the shipped dense CRF
(``core/guided.dense_crf``, the ``label.crf_*`` settings); ``densecrf_deeplab`` the same library
with DeepLab's public post-processing settings (60 px, 10 RGB levels, weight 5). ``cv_guided``
and ``cv_jbf`` need OpenCV's contrib build (``cv2.ximgproc``), which conflicts with the
opencv-python-headless wheel the project depends on; a missing one is reported and skipped.
Not a test: the figures depend on the seed and the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisy_shapes import NOISE_LEVELS, SCENES, Noise, label_quality, make_dataset, make_look, scene_noise  # noqa: E402

from syntagen_st.core.classes import VOC_CLASSES  # noqa: E402
from syntagen_st.core.config import LabelConfig  # noqa: E402
from syntagen_st.core.guided import dense_crf, label_prior, refine_label, refine_scores  # noqa: E402

CFG = LabelConfig()
LEVELS: dict[str, Noise] = {
    "clean": NOISE_LEVELS["clean"],
    "harsh": NOISE_LEVELS["harsh"],
    # Attention's own grid: 32x32 self-attention for a 512 px image, i.e. 1/16.
    "harsh-1/16": dataclasses.replace(NOISE_LEVELS["harsh"], factor=16),
}


def _guided(image: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return refine_scores(image, torch.from_numpy(prior), CFG).numpy()


def _densecrf(image: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return dense_crf(image, torch.from_numpy(prior), CFG).numpy()


def _densecrf_deeplab(image: np.ndarray, prior: np.ndarray) -> np.ndarray:
    # The public dense CRF settings of DeepLab's post-processing, with the 10 iterations.
    deeplab = dataclasses.replace(CFG, crf_spatial=60 / min(prior.shape[1:]), crf_colour=10, crf_weight=5,
                                  crf_smooth=3, crf_smooth_weight=3)
    return dense_crf(image, torch.from_numpy(prior), deeplab).numpy()


def _cv_guided(image: np.ndarray, prior: np.ndarray) -> np.ndarray:
    fil = cv2.ximgproc.createGuidedFilter(image, 16, 0.01 * 255**2)
    return np.stack([fil.filter(p) for p in prior])


def _cv_jbf(image: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return np.stack([cv2.ximgproc.jointBilateralFilter(image.astype(np.float32), p, -1, 20, 12) for p in prior])


CANDIDATES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "prior": lambda image, prior: prior,
    "guided": _guided,
    "densecrf": _densecrf,
    "densecrf_deeplab": _densecrf_deeplab,
    "cv_guided": _cv_guided,
    "cv_jbf": _cv_jbf,
}


def available(name: str) -> bool:
    if name.startswith("cv_"):
        return hasattr(cv2, "ximgproc")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--looks", default="0,1")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--scene", choices=list(SCENES), default="plain", help="rich: noisy_shapes' harder scene")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    names = [c for c in args.candidates.split(",") if available(c) or print(f"{c}: not installed, skipped")]
    print("| look | labels | as given | " + " | ".join(names) + " | shipped import with its 255 band (coverage) |")
    print("|---" * (len(names) + 4) + "|")
    for look in (int(v) for v in args.looks.split(",")):
        for level, noise in LEVELS.items():
            if args.scene == "rich":  # the rich scene's bleed and decoys, at the level's grid
                rich = scene_noise(level.split("-")[0], "rich")
                noise = dataclasses.replace(noise, bleed=rich.bleed, decoy=rich.decoy)
            data = make_dataset(args.n, args.size, args.seed + look, noise, make_look(look), SCENES[args.scene])
            given = label_quality(data["masks"], data["gt"])
            cells = []
            for name in names:
                labels, seconds = [], 0.0
                for image, mask, classes in zip(data["images"], data["masks"], data["classes"]):
                    allowed = np.array([0, *classes])
                    prior = label_prior(mask, classes, CFG.prior_confidence).numpy()
                    start = time.perf_counter()
                    probs = CANDIDATES[name](image, prior)
                    seconds += time.perf_counter() - start
                    labels.append(allowed[probs.argmax(0)].astype(np.uint8))
                q = label_quality(labels, data["gt"])
                worst = np.nanmin(q["per_class"] - given["per_class"])
                cells.append(f"{q['miou']:.3f} (worst class {worst:+.3f}; {1000 * seconds / args.n:.0f} ms)")
            banded = [refine_label(i, m, c, CFG)[1].numpy() for i, m, c in
                      zip(data["images"], data["masks"], data["classes"])]
            qb = label_quality(banded, data["gt"])
            present = ", ".join(VOC_CLASSES[c] for c in sorted({c for cs in data["classes"] for c in cs}))
            print(f"| {look} | {level} ({present}) | {given['miou']:.3f} | " + " | ".join(cells)
                  + f" | {qb['miou']:.3f} ({qb['coverage']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
