"""An imported dataset's labels refined by the image alone: which method, reach and confidence.

    python scripts/bench_import.py --windows 0.125 --passes 3 --confidences 0.8   # the table in docs/masks.md (~6 CPU minutes)
    python scripts/bench_import.py --methods crf --crf-spatial 0.25 --crf-weights 10 --doubt on --confidences 0.8 \
        --colour-weights 0,1,1.5,2 --colour-bins 6,8,12 --colour-powers 0,0.2,0.35,0.5 --colour-reaches none,0.125,0.25
    python scripts/bench_import.py                          # the whole grid (~25 CPU minutes)
    python scripts/bench_import.py --looks 0 --methods guided --windows 0.125,0.25 --passes 1,2,3,4
    python scripts/bench_import.py --methods crf --crf-spatial 0.125,0.25,0.5 --crf-weights 5,10,20
    python scripts/bench_import.py --methods crf --crf-spatial 0.25 --crf-weights 10 --doubt on --absent-doubt on,off \
        --confidences 0.8 --colour-weights 1.5                 # the absent-class rule, shipped setting otherwise

Each noisy label of the rich noisy shapes (scripts/noisy_shapes.py: 1/8-resolution blobs that bleed
across edges, decoys, thin parts) is refined as ``--source folder:`` refines it
(``core/guided.refine_label``: the label a prior of ``prior_confidence``, then the dense CRF of
``crf_spatial`` of the side and weight ``crf_weight``, or the guided filter at ``prior_kernel`` of
the side, ``prior_passes`` times; with and without the doubt rule and the absent-class rule
(``absent_doubt``); each after the per-image colour
model at ``colour_weight``, ``colour_bins``, ``colour_class_power`` and ``colour_reach``) at every
combination given, and scored
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
    parser.add_argument("--absent-doubt", default="on", help="absent_doubt values (on, off)")
    parser.add_argument("--confidences", type=floats, default=[0.7, 0.8], help="prior_confidence values")
    parser.add_argument("--colour-weights", type=floats, default=[0.0, 1.0], help="colour_weight values")
    parser.add_argument("--colour-bins", default="6", help="colour_bins values")
    parser.add_argument("--colour-powers", type=floats, default=[0.2], help="colour_class_power values")
    parser.add_argument("--colour-reaches", default="0.125", help="colour_reach values (none: anywhere)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if any(int(p) < 1 for p in args.passes.split(",")):
        parser.error("--passes: every value must be >= 1")
    for flag, value in (("--doubt", args.doubt), ("--absent-doubt", args.absent_doubt)):
        if not set(value.split(",")) <= {"on", "off"}:
            parser.error(f"{flag}: choose from on, off")
    torch.set_num_threads(args.threads)
    levels = args.levels.split(",")
    methods = args.methods.split(",")
    if not set(methods) <= {"crf", "guided"}:
        parser.error("--methods: choose from crf, guided")
    settings = [dict(prior_method="guided", prior_kernel=w, prior_passes=int(n)) for w, n in
                itertools.product(args.windows, args.passes.split(","))] * ("guided" in methods)
    settings += [dict(prior_method="crf", crf_spatial=r, crf_weight=w) for r, w in
                 itertools.product(args.crf_spatial, args.crf_weights)] * ("crf" in methods)
    doubts = [(d, a) for d in args.doubt.split(",") for a in args.absent_doubt.split(",")]
    reaches = [None if v == "none" else float(v) for v in args.colour_reaches.split(",")]
    colours = [dict(colour_weight=0.0)] * (0.0 in args.colour_weights)  # off once, not once per bins / power / reach
    colours += [dict(colour_weight=w, colour_bins=int(b), colour_class_power=p, colour_reach=r) for w, b, p, r in
                itertools.product(args.colour_weights, args.colour_bins.split(","), args.colour_powers, reaches) if w]
    print("| look | method | reach, passes or weight | doubt, absent doubt | confidence | colour weight, bins, power, reach | "
          + " | ".join(levels)
          + " | ms/img |")
    print("|---" * (len(levels) + 7) + "|")
    for look in (int(v) for v in args.looks.split(",")):
        sets = {lv: make_dataset(args.n, args.size, args.seed, scene_noise(lv, "rich"), make_look(look), SCENES["rich"])
                for lv in levels}
        given = {lv: label_quality(d["masks"], d["gt"]) for lv, d in sets.items()}
        print(f"| {look} | as given | | | | | " + " | ".join(f"{given[lv]['miou']:.3f}" for lv in levels) + " | |")
        for setting, doubt, confidence, colour in itertools.product(settings, doubts, args.confidences, colours):
            cfg = dataclasses.replace(LabelConfig(), **setting, **colour, prior_doubt=doubt[0] == "on",
                                      absent_doubt=doubt[1] == "on", prior_confidence=confidence)
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
            shade = (f"{cfg.colour_weight:g}, {cfg.colour_bins}, {cfg.colour_class_power:g}, "
                     f"{'anywhere' if cfg.colour_reach is None else f'{cfg.colour_reach:g}'}" if cfg.colour_weight else "off")
            print(f"| {look} | {cfg.prior_method} | {reach} | {doubt[0]}, {doubt[1]} | {confidence:g} | {shade} | "
                  + " | ".join(cells)
                  + f" | {1000 * seconds / count:.1f} |", flush=True)


if __name__ == "__main__":
    main()
