"""Does held-out relabelling raise label quality? A standalone check of syntagen_st.refine.

    python scripts/prove_relabel.py --n 600 --steps 1000,2000,4000 --threads 2

Builds a noisy shapes set (scripts/noisy_shapes.py), trains LR-ASPP from scratch on CPU on one
half, predicts the other half (never trained on), refines its labels with the refine functions
and prints label mIoU against the truth before and after (255 counted as a miss), coverage,
and the mIoU of the kept samples after dropping the worst-scored ones, at each training budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from noisy_shapes import label_quality, make_dataset  # noqa: E402

from syntagen_st.core.config import RefineConfig  # noqa: E402
from syntagen_st.selftrain import refine  # noqa: E402


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def predict_probs(model: torch.nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = [F.softmax(model(_tensor(images[i : i + batch]))["out"], dim=1) for i in range(0, len(images), batch)]
    model.train()
    return torch.cat(out).numpy()


def refine_half(data: dict, probs: np.ndarray, cfg: RefineConfig, gate: bool) -> dict[str, float]:
    """Relabel, score and drop as the loop will; returns label quality figures."""
    views = [refine.restricted(p, c) for p, c in zip(probs, data["classes"])]
    evidence = sum((refine.class_evidence(m, v.pred, cfg.core_margin) for m, v in zip(data["masks"], views)),
                   refine.ClassEvidence())
    reliable = (
        refine.reliable_classes(evidence, cfg.min_reliability, cfg.max_core_agreement, cfg.min_class_pixels,
                                cfg.min_core_persistence)
        if gate else np.ones(len(evidence.confusion), dtype=bool)
    )
    refined = [
        refine.relabel(m, v, reliable, cfg.relabel_confidence, cfg.keep_confidence)
        for m, v in zip(data["masks"], views)
    ]
    scores = {
        f"{i:05d}": refine.sample_score(m, v.pred, v.top, c, cfg.confidence_weight)
        for i, (m, v, c) in enumerate(zip(refined, views, data["classes"]))
    }
    # Scores from a model reliable for no class rank noise: drop nothing then.
    dropped = refine.select_drops(scores, cfg.drop_fraction if reliable[1:].any() else 0.0)
    kept = [i for i in range(len(refined)) if f"{i:05d}" not in dropped]
    after = label_quality(refined, data["gt"])
    kept_q = label_quality([refined[i] for i in kept], [data["gt"][i] for i in kept])
    failed_dropped = sum(bool(data["failed"][int(i)]) for i in dropped)
    return {
        "reliable": int(reliable[1:].sum()), "after": after["miou"], "coverage": after["coverage"],
        "kept": kept_q["miou"], "failed_dropped": failed_dropped, "failed": int(data["failed"].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="1000,2000,4000", help="budgets at which to refine")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-probs", default="", help="save held-out probabilities to PREFIX_<step>.npy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = make_dataset(args.n, args.size, args.seed)
    half = args.n // 2
    train = {k: v[:half] for k, v in data.items()}
    held = {k: v[half:] for k, v in data.items()}
    before = label_quality(held["masks"], held["gt"])
    print(f"held-out labels: mIoU {before['miou']:.3f} (255 as miss), coverage {before['coverage']:.3f}")

    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    budgets = sorted(int(s) for s in args.steps.split(","))
    optim = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: (1 - s / budgets[-1]) ** 0.9)
    images, masks = _tensor(train["images"]), torch.from_numpy(train["masks"]).long()
    gen = torch.Generator().manual_seed(args.seed)
    cfg = RefineConfig()
    start = time.time()
    for step in range(1, budgets[-1] + 1):
        idx = torch.randint(half, (args.batch,), generator=gen)
        x, y = images[idx], masks[idx]
        if torch.rand((), generator=gen) < 0.5:  # horizontal flip
            x, y = x.flip(-1), y.flip(-1)
        loss = F.cross_entropy(model(x)["out"], y, ignore_index=255)
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
        if step in budgets:
            probs = predict_probs(model, held["images"])
            if args.save_probs:
                np.save(f"{args.save_probs}_{step}.npy", probs.astype(np.float16))
            model_q = label_quality(probs.argmax(1).astype(np.uint8), held["gt"])
            line = f"step {step} ({time.time() - start:.0f}s): model vs truth {model_q['miou']:.3f}"
            for gate in (True, False):
                r = refine_half(held, probs, cfg, gate)
                line += (
                    f" | {'gated' if gate else 'ungated'}: {r['reliable']} reliable, labels {before['miou']:.3f}"
                    f" -> {r['after']:.3f} (coverage {r['coverage']:.3f}), kept {r['kept']:.3f},"
                    f" failed dropped {r['failed_dropped']}/{r['failed']}"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
