"""Which per-class reliability gate lets relabelling help at every noise level? Offline, on a bench run.

    python scripts/gate_study.py --work DIR --noise harsh [--look 0 --images 400 --size 64 --seed 0]

Reads the round-0 fold models of ``scripts/bench_refine.py --work DIR`` (the data is regenerated
from the same seed, noise and look), predicts every sample with the fold model that did not train
on it (plain, and with horizontal-flip averaging), and for each candidate gate relabels every
sample with ``refine.relabel`` and prints per-class label IoU against the truth (255 a miss).
Per class it also prints the statistics a gate can use without the truth, beside the oracle:
the change when only that class (and background) is open.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisy_shapes import NOISE_LEVELS, label_quality, make_dataset, make_look  # noqa: E402

from syntagen_st.core.classes import NUM_CLASSES, VOC_CLASSES  # noqa: E402
from syntagen_st.core.config import RefineConfig  # noqa: E402
from syntagen_st.core.layout import RunLayout  # noqa: E402
from syntagen_st.core.seeds import sample_id  # noqa: E402
from syntagen_st.segmentation.network import load_model, predict_proba  # noqa: E402
from syntagen_st.selftrain import refine as rf  # noqa: E402
from syntagen_st.selftrain.pool import assign_folds  # noqa: E402


def held_out_probs(run: Path, images: np.ndarray, ids: list[str], folds: int, seed: int, flip: bool,
                   only: int | None, trained: bool = False) -> list[np.ndarray]:
    """Each sample's probabilities from the fold model that did not train on it (``trained``:
    from one that did, with 2 folds)."""
    fold = assign_folds(ids, folds, seed)
    if only is not None:
        ids = [sid for sid in ids if fold[sid] == only]
    out: list[np.ndarray] = [None] * len(ids)  # type: ignore[list-item]
    for k in range(folds) if only is None else [only]:
        which = (k + 1) % folds if trained else k
        model = load_model(RunLayout(run).fold(0, which).weights)
        idx = [i for i, sid in enumerate(ids) if fold[sid] == k]
        probs = list(predict_proba(model, [images[i] for i in idx], batch_size=64))
        if flip:
            flipped = predict_proba(model, [np.ascontiguousarray(images[i][:, ::-1]) for i in idx], batch_size=64)
            probs = [(p + f[:, :, ::-1]) / 2 for p, f in zip(probs, flipped)]
        for i, p in zip(idx, probs):
            out[i] = p
    return out


def relabel_all(data: dict, probs: list[np.ndarray], reliable: np.ndarray, cfg: RefineConfig) -> list[np.ndarray]:
    return [
        rf.relabel(data["masks"][i], rf.restricted(probs[i], data["classes"][i]), reliable, cfg.relabel_confidence, cfg.keep_confidence)
        for i in range(len(probs))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--noise", required=True, choices=list(NOISE_LEVELS))
    parser.add_argument("--look", type=int, default=0)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--fold", type=int, default=None, help="only the samples of this fold")
    parser.add_argument("--margins", type=lambda v: [int(x) for x in v.split(",")], default=[2, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = make_dataset(args.images, args.size, args.seed, NOISE_LEVELS[args.noise], make_look(args.look))
    # The pool ids the folder source gave the training files, in their order: folds are dealt on them.
    ids = [sample_id(0, i) for i in range(args.images)]
    run = Path(args.work) / args.noise / "run"
    if args.fold is not None:  # an early look, on the samples of one fold whose model is trained
        keep = [i for i, sid in enumerate(ids) if assign_folds(ids, args.folds, args.seed)[sid] == args.fold]
        data = {k: [v[i] for i in keep] if isinstance(v, list) else v[keep] for k, v in data.items()}
    cfg = RefineConfig()
    before = label_quality(data["masks"], data["gt"])["per_class"]
    present = np.flatnonzero(~np.isnan(before))
    print(f"noise {args.noise}: labels {np.nanmean(before):.3f}; "
          + " ".join(f"{VOC_CLASSES[c]} {before[c]:.2f}" for c in present))
    for flip in (False, True):
        probs = held_out_probs(run, data["images"], ids, args.folds, args.seed, flip, args.fold)
        preds = [rf.restricted(p, data["classes"][i]).pred for i, p in enumerate(probs)]
        model_q = label_quality(preds, data["gt"])["per_class"]
        stats = {m: rf.ClassEvidence() for m in args.margins}
        for i, pred in enumerate(preds):
            for m in args.margins:
                stats[m] = stats[m] + rf.class_evidence(data["masks"][i], pred, m / args.size)
        print(f"\n-- flip TTA {flip}: held-out model vs truth {np.nanmean(model_q):.3f}")
        first = stats[args.margins[0]].confusion
        tp = np.diag(first).astype(float)
        prec, rec = tp / np.maximum(first.sum(0), 1), tp / np.maximum(first.sum(1), 1)
        print("  class        label  model | iou_all prec  rec  | core_iou at margins " + str(args.margins)
              + " | only c open vs all shut")
        # The fold model that trained on each sample: how much label noise it memorised.
        fitted = held_out_probs(run, data["images"], ids, args.folds, args.seed, flip, args.fold, trained=True)
        fit_conf = sum(rf.confusion_matrix(rf.restricted(p, data["classes"][i]).pred, data["masks"][i])
                       for i, p in enumerate(fitted))
        fit_iou = rf.class_iou(fit_conf)
        gap = fit_iou - rf.class_iou(first)
        print("  in-fold model vs labels (iou_all): " + " ".join(f"{VOC_CLASSES[c]} {fit_iou[c]:.3f}" for c in present))
        print("  gap in-fold - held-out:            " + " ".join(f"{VOC_CLASSES[c]} {gap[c]:+.3f}" for c in present))
        shut = label_quality(relabel_all(data, probs, np.zeros(NUM_CLASSES, bool), cfg), data["gt"])["per_class"]
        for c in present:
            only = np.zeros(NUM_CLASSES, bool)
            only[[0, c]] = True
            q = label_quality(relabel_all(data, probs, only, cfg), data["gt"])["per_class"][c] if c else np.nan
            cores = " ".join(f"{stats[m].core_iou()[c]:.3f}" for m in args.margins)
            print(f"  {VOC_CLASSES[c]:<12} {before[c]:.3f} {model_q[c]:.3f} | {rf.class_iou(first)[c]:.3f} "
                  f"{prec[c]:.3f} {rec[c]:.3f} | {cores} | {q - shut[c]:+.3f}")
        gates = {
            "shut": np.zeros(NUM_CLASSES, bool),
            "all open": np.isin(np.arange(NUM_CLASSES), present),
            "iou_all>=0.5 (old)": rf.reliable_from(rf.class_iou(first), first.sum(axis=1), 0.5, 1000),
        }
        for u in (0.5, 0.75):
            over_all = np.nan_to_num(rf.class_iou(first), nan=1.0) <= u
            gates[f"core>=0.5 & all<={u}"] = rf.reliable_from(stats[args.margins[0]].core_iou(), stats[args.margins[0]].support(),
                                                              0.5, 1000) & (over_all | (np.arange(NUM_CLASSES) == 0))
        for u in (0.8, 0.85, 0.9):
            gates[f"0.5<=core<={u}"] = rf.reliable_classes(stats[args.margins[0]], 0.5, u, 1000, 0.0)
        gates["0.5<=core<=0.85 & persists>=0.8"] = rf.reliable_classes(stats[args.margins[0]], 0.5, 0.85, 1000, 0.8)
        for t in (0.6, 0.7):
            gates[f"prec&rec>={t}"] = rf.reliable_from(np.minimum(prec, rec), first.sum(axis=1), t, 1000)
        for m in args.margins:
            for t in (0.5, 0.6, 0.7, 0.8):
                gates[f"core{m}_iou>={t}"] = rf.reliable_from(stats[m].core_iou(), stats[m].support(), t, 1000)
        for name, reliable in gates.items():
            after = label_quality(relabel_all(data, probs, reliable, cfg), data["gt"])["per_class"]
            delta = after - before
            print(f"  gate {name:<20} mIoU {np.nanmean(after):.3f} ({np.nanmean(after) - np.nanmean(before):+.3f}), "
                  f"worst class {np.nanmin(delta):+.3f}; open: "
                  + ",".join(VOC_CLASSES[c] for c in np.flatnonzero(reliable)))


if __name__ == "__main__":
    main()
