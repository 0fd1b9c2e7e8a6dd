"""``python -m syntagen_st.evaluate TARGET (--voc-root PATH | --data PATH) [--out metrics.json]``

Per-class IoU and mIoU of a trained segmenter at full resolution. TARGET is a weights file
(.safetensors or a Lightning .ckpt), a training output folder (model.safetensors), or a run
folder (final/model.safetensors). --voc-root reads the ``val`` split of a VOC tree; --data any
dataset folder (a VOC tree's val split, a pool, images/ + masks/). Prints the 21-class table
and writes metrics.json beside the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .core.cli import check_out, config_from, config_parser, run_main
from .core.errors import UserError
from .core.store import atomic_write_json, sha256_file

PROG = "syntagen_st.evaluate"


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(f"python -m {PROG}", "Per-class IoU and mIoU of a trained segmenter.", sections=(),
                           shortcuts=("num_workers",), images=True)
    parser.add_argument("target", help="weights (.safetensors / .ckpt), a training output folder, or a run folder")
    parser.add_argument("--voc-root", default=None, help="VOC tree (VOCdevkit's parent, VOCdevkit, or VOC2012): its val split")
    parser.add_argument("--data", default=None, help="any dataset folder (a VOC tree's val split, a pool, images/ + masks/)")
    parser.add_argument("--out", default=None, help="metrics file (default: metrics.json beside the weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ns = parser.parse_args(argv)
    cfg = config_from(parser, ns)
    # The stages load torch, diffusers and Lightning: only once the flags and the config are good.
    from .core.device import resolve_device
    from .segmentation.data import find_samples, find_voc_samples
    from .segmentation.evaluate import evaluate, resolve_weights
    from .segmentation.metrics import format_table
    from .segmentation.network import load_model
    if (ns.voc_root is None) == (ns.data is None):
        raise UserError("give exactly one of --voc-root PATH or --data PATH")
    if ns.out:
        check_out(ns.out, file=True)
    samples = find_voc_samples(ns.voc_root, "val") if ns.voc_root is not None else find_samples(ns.data, "val")
    weights = resolve_weights(ns.target)
    model = load_model(weights)
    metrics = evaluate(model, samples, resolve_device(ns.device, "--device"), cfg.train.num_workers)
    metrics |= {"weights": str(weights), "weights_sha256": sha256_file(weights), "data": str(ns.voc_root or ns.data)}
    out = Path(ns.out) if ns.out else weights.parent / "metrics.json"
    atomic_write_json(out, metrics)
    print(format_table(metrics))
    print(f"images: {metrics['images']}  metrics: {out}")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
