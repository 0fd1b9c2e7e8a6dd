"""An imported dataset's labels refined by the image alone: which method, reach and confidence.

    python scripts/bench_import.py --windows 0.125 --passes 3 --confidences 0.8   # the table in docs/masks.md (~4 CPU minutes)
    python scripts/bench_import.py                          # the whole grid (~25 CPU minutes)
    python scripts/bench_import.py --looks 0 --methods guided --windows 0.125,0.25 --passes 1,2,3,4
    python scripts/bench_import.py --methods crf --crf-spatial 0.125,0.25,0.5 --crf-weights 5,10,20

Each noisy label of the rich noisy shapes (scripts/noisy_shapes.py: 1/8-resolution blobs that bleed
across edges, decoys, thin parts) is refined as ``--source folder:`` refines it
(``core/guided.refine_label``: the label a prior of ``prior_confidence``, then the dense CRF of
``crf_spatial`` of the side and weight ``crf_weight``, or the guided filter at ``prior_kernel`` of
the side, ``prior_passes`` times; with and without the doubt rule) at every combination given, and scored
against the truth with 255 counted as a miss, at every noise level and look: the gain, the worst
class's change (what a clean label must not lose) and the thin classes' (bicycle, chair), which a
wide window can erase. Not a test: the figures depend on the seed and the size.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisy_shapes import NOISE_LEVELS, SCENES, THIN_SHAPES, label_quality, make_dataset, make_look, scene_noise  # noqa: E402

from syntagen_st.core.classes import VOC_CLASSES  # noqa: E402
from syntagen_st.core.config import LabelConfig  # noqa: E402
from syntagen_st.core.guided import refine_label  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--looks", default="0,1,2")
    parser.add_argument("--levels", default=",".join(NOISE_LEVELS))
    parser.add_argument("--methods", default="crf,guided", help="prior_method values")
    parser.add_argument("--windows", type=floats, default=[0.0625, 0.125, 0.25], help="prior_kernel values (guided)")
    parser.add_argument("--passes", default="1,3", help="prior_passes values (guided)")
    parser.add_argument("--crf-spatial", type=floats, default=[0.125, 0.25, 0.5], help="crf_spatial values")
    parser.add_argument("--crf-weights", type=floats, default=[5.0, 10.0], help="crf_weight values")
    parser.add_argument("--doubt", default="on,off", help="prior_doubt values")
    parser.add_argument("--confidences", type=floats, default=[0.7, 0.8], help="prior_confidence values")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if any(int(p) < 1 for p in args.passes.split(",")):
        parser.error("--passes: every value must be >= 1")
    if not set(args.doubt.split(",")) <= {"on", "off"}:
        parser.error("--doubt: choose from on, off")
    torch.set_num_threads(args.threads)
    levels = args.levels.split(",")
    methods = args.methods.split(",")
    if not set(methods) <= {"crf", "guided"}:
        parser.error("--methods: choose from crf, guided")
    settings = [dict(prior_method="guided", prior_kernel=w, prior_passes=int(n)) for w, n in
                itertools.product(args.windows, args.passes.split(","))] * ("guided" in methods)
    settings += [dict(prior_method="crf", crf_spatial=r, crf_weight=w) for r, w in
                 itertools.product(args.crf_spatial, args.crf_weights)] * ("crf" in methods)
    doubts = [{"on": True, "off": False}[v] for v in args.doubt.split(",")]
    print("| look | method | reach, passes or weight | doubt | confidence | " + " | ".join(levels) + " | ms/img |")
    print("|---" * (len(levels) + 6) + "|")
    for look in (int(v) for v in args.looks.split(",")):
        sets = {lv: make_dataset(args.n, args.size, args.seed, scene_noise(lv, "rich"), make_look(look), SCENES["rich"])
                for lv in levels}
        given = {lv: label_quality(d["masks"], d["gt"]) for lv, d in sets.items()}
        print(f"| {look} | as given | | | | " + " | ".join(f"{given[lv]['miou']:.3f}" for lv in levels) + " | |")
        for setting, doubt, confidence in itertools.product(settings, doubts, args.confidences):
            cfg = dataclasses.replace(LabelConfig(), **setting, prior_doubt=doubt, prior_confidence=confidence)
            reach = (f"{cfg.crf_spatial:g} of the side, weight {cfg.crf_weight:g}" if cfg.prior_method == "crf" else
                     f"{cfg.prior_kernel:g} of the side, {cfg.prior_passes} passes")
            cells, seconds, count = [], 0.0, 0
            for lv, d in sets.items():
                start = time.perf_counter()
                labels = [refine_label(i, m, c, cfg)[1].numpy() for i, m, c in zip(d["images"], d["masks"], d["classes"])]
                seconds, count = seconds + time.perf_counter() - start, count + len(labels)
                q, b = label_quality(labels, d["gt"]), given[lv]
                present = ~np.isnan(b["per_class"])
                worst = np.nanmin(q["per_class"][present] - b["per_class"][present])
                thin = ", ".join(f"{VOC_CLASSES[c]} {q['per_class'][c] - b['per_class'][c]:+.3f}" for c in THIN_SHAPES
                                 if present[c])
                cells.append(f"{q['miou']:.3f} ({q['miou'] - b['miou']:+.3f}; worst {worst:+.3f}; {thin})")
            print(f"| {look} | {cfg.prior_method} | {reach} | {'on' if doubt else 'off'} | {confidence:g} | " + " | ".join(cells)
                  + f" | {1000 * seconds / count:.1f} |", flush=True)


if __name__ == "__main__":
    main()
