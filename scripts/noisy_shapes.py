"""A shapes dataset with known ground truth and attention-like label noise.

    python scripts/noisy_shapes.py --out DIR --n 600 --size 64 --seed 0 --noise harsh --look 1

Writes the plain folder format that ``--source folder:DIR`` reads: images/<id>.png (RGB),
masks/<id>.png (noisy labels), gt/<id>.png (truth), classes.jsonl ({"id", "classes"}).

Each image shows 1-3 objects drawn from one co-occurring pair of VOC classes; a class fixes
the object's shape, colour and texture, so a small CNN can learn it. The labels are made the
way attention labels go wrong: each object's mask is seen through a 1/8-resolution score map
(blobby), thresholded at a random level (boundaries too wide or too narrow), with a 255 band
where the score is near the threshold; some objects are missing, some take the class of their
pair partner (swapped), and some images get another image's label altogether (failed).

``--noise`` picks the strength (``NOISE_LEVELS``: clean, moderate, harsh) and ``--look`` the
appearance: look 0 is the fixed shape / colour / texture of each class, any other look draws
them (and a wider colour jitter) from its own seed, so a method is not tuned to one picture.

``--scene rich`` (``SCENES``) makes the pictures and the noise harder, closer to what attention
labels of SD images get wrong: striped backgrounds of random period and angle; unlabelled decoy
blobs, which the labels sometimes take for an object of the image; a third pair of classes with
thin parts (bicycle: a rim with spokes, chair: a seat on thin legs), where refinement by the
image can erase what is thinner than its window; holes in some objects; and label noise whose
blobs bleed across the objects' edges by a smooth random amount (``Noise.bleed``, per level in
``RICH_BLEED``). ``--scene plain`` (the default here) draws exactly the data of earlier versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from syntagen_st.core.classes import IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES  # noqa: E402
from syntagen_st.core.store import save_image, save_mask  # noqa: E402

# Co-occurring pairs: a swap exchanges the two classes of a pair, as attention mixes up
# objects that appear together.
PAIRS: tuple[tuple[int, int], ...] = ((8, 12), (15, 13), (7, 6))  # cat-dog, person-horse, car-bus
SHAPES: dict[int, str] = {8: "circle", 12: "square", 15: "triangle", 13: "ellipse", 7: "diamond", 6: "cross"}
COLOURS: dict[int, tuple[int, int, int]] = {
    8: (240, 130, 20), 12: (140, 40, 180), 15: (250, 150, 190),
    13: (150, 20, 20), 7: (30, 90, 230), 6: (235, 220, 40),
}
TEXTURES: dict[int, str] = {8: "hstripes", 12: "vstripes", 15: "dots", 13: "checker", 7: "diagonal", 6: "plain"}
THIN_PAIRS: tuple[tuple[int, int], ...] = ((2, 9),)  # bicycle-chair: the rich scene's thin classes
THIN_SHAPES: dict[int, str] = {2: "wheel", 9: "chair"}
THIN_COLOURS: dict[int, tuple[int, int, int]] = {2: (30, 200, 110), 9: (225, 225, 225)}
THIN_TEXTURES: dict[int, str] = {2: "plain", 9: "plain"}
SHAPE_KINDS = ("circle", "square", "triangle", "ellipse", "diamond", "cross", "ring", "bar")
TEXTURE_KINDS = ("hstripes", "vstripes", "dots", "checker", "diagonal", "plain")
MAX_OBJECTS = 3


@dataclass(frozen=True)
class Look:
    """How each class is drawn: shape, RGB colour, texture, and the per-object colour jitter."""

    shapes: dict[int, str]
    colours: dict[int, tuple[int, int, int]]
    textures: dict[int, str]
    jitter: float = 0.15


def make_look(look: int) -> Look:
    """Look 0 is the fixed recipe; another look gives the six classes distinct shapes, random
    colours at least 80 apart (so a small CNN can still tell them) and random textures. The thin
    classes keep their shapes; another look draws their colours after the six's."""
    if look == 0:
        return Look(SHAPES | THIN_SHAPES, COLOURS | THIN_COLOURS, TEXTURES | THIN_TEXTURES)
    rng = np.random.default_rng([look, 1729])
    classes = list(SHAPES)
    shapes = [str(k) for k in rng.permutation(SHAPE_KINDS)[: len(classes)]]
    colours: list[tuple[int, int, int]] = []
    while len(colours) < len(classes):
        c = rng.integers(20, 256, size=3)
        if all(np.abs(c - np.array(o)).sum() >= 80 for o in colours):
            colours.append(tuple(int(v) for v in c))
    textures = [str(t) for t in rng.choice(TEXTURE_KINDS, size=len(classes))]
    while len(colours) < len(classes) + len(THIN_SHAPES):
        c = rng.integers(20, 256, size=3)
        if all(np.abs(c - np.array(o)).sum() >= 80 for o in colours):
            colours.append(tuple(int(v) for v in c))
    thin_colours = dict(zip(THIN_SHAPES, colours[len(classes):]))
    return Look(dict(zip(classes, shapes)) | THIN_SHAPES, dict(zip(classes, colours)) | thin_colours,
                dict(zip(classes, textures)) | THIN_TEXTURES, jitter=0.25)


@dataclass(frozen=True)
class Noise:
    """Label-noise recipe; the defaults ("harsh") put labels near 0.55 mIoU (255 as a miss)."""

    factor: int = 8
    """The attention map's downsampling: labels are seen at size / factor."""
    score_noise: float = 0.1
    threshold: tuple[float, float] = (0.3, 0.6)
    """Per-object threshold range: low dilates the object, high erodes it."""
    band: float = 0.12
    """Relative score band around the threshold that becomes 255."""
    missing: float = 0.08
    swapped: float = 0.12
    failed: float = 0.06
    bleed: float = 0.0
    """Score added around each object, a smooth random field over a one-cell halo: its label
    bleeds across the object's edges, more on one side than another (the rich scene's)."""
    decoy: float = 0.0
    """Chance that a decoy blob is labelled as one of the image's classes (the rich scene's)."""


@dataclass(frozen=True)
class Scene:
    """What the pictures hold besides the objects (``SCENES``)."""

    striped_background: bool = False
    decoys: int = 0
    """Up to this many unlabelled blobs of random shape and colour per image."""
    thin: bool = False
    """The bicycle-chair pair, with parts a few pixels wide, joins the pairs."""
    holes: float = 0.0
    """Chance that an object has a hole the background shows through."""


SCENES: dict[str, Scene] = {"plain": Scene(), "rich": Scene(striped_background=True, decoys=2, thin=True, holes=0.3)}
RICH_BLEED: dict[str, tuple[float, float]] = {"clean": (0.0, 0.0), "moderate": (0.3, 0.15), "harsh": (0.6, 0.3)}
"""Per level, the rich scene's (``Noise.bleed``, ``Noise.decoy``)."""


NOISE_LEVELS: dict[str, Noise] = {
    # Blur at 1/2 resolution and a narrow band only: labels near 0.98 mIoU, where a model
    # must leave them alone.
    "clean": Noise(factor=2, score_noise=0.03, threshold=(0.45, 0.55), band=0.05, missing=0.0, swapped=0.0, failed=0.0),
    # 1/4 resolution, fewer class errors: about 0.7 mIoU.
    "moderate": Noise(factor=4, score_noise=0.08, threshold=(0.35, 0.6), band=0.1, missing=0.05, swapped=0.06, failed=0.03),
    # The original recipe: about 0.4-0.55 IoU per foreground class against the truth.
    "harsh": Noise(),
}


def _shape(kind: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if kind == "triangle":
        return (dy <= 0.7 * r) & (2 * ax <= dy + r)
    if kind == "ellipse":
        return (dx / (1.3 * r)) ** 2 + (dy / (0.7 * r)) ** 2 <= 1
    if kind == "diamond":
        return ax + ay <= 1.2 * r
    if kind == "cross":
        return ((ax <= 0.35 * r) & (ay <= r)) | ((ay <= 0.35 * r) & (ax <= r))
    if kind == "ring":
        return (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.5 * r) ** 2)
    if kind == "bar":
        return (ax <= 1.3 * r) & (ay <= 0.45 * r)
    if kind == "wheel":  # a rim, a hub and four spokes about 0.1 r wide
        d = np.sqrt(dx**2 + dy**2)
        spoke = (ax <= 0.06 * r) | (ay <= 0.06 * r) | (np.abs(ax - ay) <= 0.085 * r)
        return (np.abs(d - 0.88 * r) <= 0.12 * r) | (d <= 0.2 * r) | (spoke & (d <= r))
    if kind == "chair":  # a back, a seat and two thin legs
        seat = (np.abs(dy) <= 0.12 * r) & (ax <= 0.8 * r)
        back = (np.abs(dx + 0.7 * r) <= 0.1 * r) & (dy >= -r) & (dy <= 0)
        legs = (np.abs(ax - 0.7 * r) <= 0.08 * r) & (dy >= 0) & (dy <= r)
        return seat | back | legs
    raise ValueError(kind)


def _texture(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if kind == "hstripes":
        return np.sin(y * np.pi / 3) > 0
    if kind == "vstripes":
        return np.sin(x * np.pi / 3) > 0
    if kind == "dots":
        return (x % 6 - 2.5) ** 2 + (y % 6 - 2.5) ** 2 < 4
    if kind == "checker":
        return (x // 4 + y // 4) % 2 == 0
    if kind == "diagonal":
        return np.sin((x + y) * np.pi / 4) > 0
    return np.ones_like(x, dtype=bool)


def _upsample(low: np.ndarray, size: int) -> np.ndarray:
    """(N, C, h, w) -> (N, C, size, size), bilinear: what upsampling an attention map does."""
    t = torch.from_numpy(low.astype(np.float32))
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).numpy()


def make_dataset(
    n: int, size: int, seed: int, noise: Noise = Noise(), look: Look | None = None, scene: Scene = Scene()
) -> dict[str, np.ndarray | list]:
    """images (n, size, size, 3) uint8, gt and masks (n, size, size) uint8, classes (the named
    VOC ids of each sample) and failed (bool (n,): the label belongs to another image).
    The plain scene draws the same random numbers as before the rich one existed."""
    look = look or make_look(0)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)

    pairs = PAIRS + THIN_PAIRS if scene.thin else PAIRS
    pair = np.array(pairs)[rng.integers(len(pairs), size=n)]  # (n, 2)
    count = rng.integers(1, MAX_OBJECTS + 1, size=n)
    active = np.arange(MAX_OBJECTS)[None] < count[:, None]  # (n, K)
    which = rng.integers(2, size=(n, MAX_OBJECTS))
    cls = np.take_along_axis(pair, which, axis=1)  # (n, K)
    partner = np.take_along_axis(pair, 1 - which, axis=1)
    r = rng.uniform(0.12, 0.24, size=(n, MAX_OBJECTS)) * size
    cx = rng.uniform(0.15, 0.85, size=(n, MAX_OBJECTS)) * size
    cy = rng.uniform(0.15, 0.85, size=(n, MAX_OBJECTS)) * size

    # Background: smooth low-frequency colour noise around a random muted tint.
    tint = rng.uniform(60, 160, size=(n, 3, 1, 1))
    image = tint + _upsample(rng.normal(0, 30, size=(n, 3, 4, 4)), size) + rng.normal(0, 8, size=(n, 3, size, size))
    decoys = np.zeros((n, 0, size, size), dtype=bool)
    if scene.striped_background:
        angle, period = rng.uniform(0, np.pi, size=(n, 1, 1)), rng.uniform(4, 12, size=(n, 1, 1))
        phase = (x[None] * np.cos(angle) + y[None] * np.sin(angle)) * 2 * np.pi / period
        image += rng.uniform(15, 35, size=(n, 1, 1, 1)) * np.sign(np.sin(phase))[:, None]
    if scene.decoys:
        decoys = _draw_decoys(rng, image, scene.decoys, x, y)
    holes = rng.uniform(size=(n, MAX_OBJECTS)) < scene.holes if scene.holes else np.zeros((n, MAX_OBJECTS), bool)

    owner = np.full((n, size, size), -1, dtype=np.int64)  # painter's order: later objects on top
    for k in range(MAX_OBJECTS):
        dx, dy = x[None] - cx[:, k, None, None], y[None] - cy[:, k, None, None]
        inside = np.zeros((n, size, size), dtype=bool)
        for c, kind in look.shapes.items():
            sel = active[:, k] & (cls[:, k] == c)
            if sel.any():
                inside[sel] = _shape(kind, dx[sel], dy[sel], r[sel, k, None, None])
                # A hole off the centre (thin shapes have their own gaps).
                cut = sel & holes[:, k] & (c not in THIN_SHAPES)
                if cut.any():
                    hx, hy = dx[cut] + 0.2 * r[cut, k, None, None], dy[cut] - 0.1 * r[cut, k, None, None]
                    inside[cut] &= hx**2 + hy**2 > (0.35 * r[cut, k, None, None]) ** 2
                shade = 0.6 + 0.4 * _texture(look.textures[c], x, y)
                colour = np.array(look.colours[c], dtype=np.float32)[None, :, None, None]
                jitter = rng.uniform(1 - look.jitter, 1 + look.jitter, size=(int(sel.sum()), 1, 1, 1))
                obj = colour * shade[None, None] * jitter
                keep = inside[sel][:, None]
                image[sel] = np.where(keep, obj, image[sel])
        owner[inside] = k
    image = np.clip(image, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    gt = np.where(owner >= 0, np.take_along_axis(cls, np.maximum(owner, 0).reshape(n, -1), 1).reshape(owner.shape), 0)

    # Attention-like labels: each visible object's mask seen at 1/factor resolution.
    visible = (owner[:, None] == np.arange(MAX_OBJECTS)[None, :, None, None]).astype(np.float32)
    if decoys.shape[1]:
        # A decoy the labels take for an object is one more channel, of a class of the image.
        fooled = rng.uniform(size=decoys.shape[:2]) < noise.decoy
        seen = decoys & fooled[:, :, None, None] & (owner[:, None] < 0)
        visible = np.concatenate([visible, seen.astype(np.float32)], axis=1)
        decoy_cls = np.take_along_axis(cls, rng.integers(count[:, None], size=fooled.shape), 1)
        cls, partner = np.concatenate([cls, decoy_cls], 1), np.concatenate([partner, decoy_cls], 1)
    channels, cells = visible.shape[1], size // noise.factor
    low = visible.reshape(n, channels, cells, noise.factor, cells, noise.factor)
    jitter = rng.normal(0, noise.score_noise, size=(n, MAX_OBJECTS, cells, cells))
    if channels > MAX_OBJECTS:
        jitter = np.concatenate([jitter, rng.normal(0, noise.score_noise, size=(n, channels - MAX_OBJECTS, cells, cells))], 1)
    low = low.mean(axis=(3, 5)) + jitter
    if noise.bleed:
        halo = F.max_pool2d(torch.from_numpy(low.astype(np.float32)), 3, 1, 1).numpy()
        field = _upsample(rng.uniform(0, 1, size=(n, channels, 2, 2)), cells)
        low = np.maximum(low, noise.bleed * halo * field)
    score = _upsample(low, size)
    roll = rng.uniform(size=(n, MAX_OBJECTS))
    if channels > MAX_OBJECTS:
        roll = np.concatenate([roll, np.full((n, channels - MAX_OBJECTS), 0.5)], 1)  # decoys: neither missing nor swapped
    score[roll < noise.missing] = 0.0
    label_cls = np.where(roll > 1 - noise.swapped, partner, cls)
    threshold = rng.uniform(*noise.threshold, size=(n, MAX_OBJECTS, 1, 1))
    if channels > MAX_OBJECTS:
        threshold = np.concatenate([threshold, rng.uniform(*noise.threshold, size=(n, channels - MAX_OBJECTS, 1, 1))], 1)
    ratio = score / threshold
    top = ratio.argmax(axis=1)
    best = np.take_along_axis(ratio, top[:, None], 1)[:, 0]
    masks = np.take_along_axis(label_cls, top.reshape(n, -1), 1).reshape(top.shape)
    masks = np.where(best >= 1 + noise.band, masks, 0)
    masks = np.where(np.abs(best - 1) < noise.band, IGNORE_INDEX, masks).astype(np.uint8)
    failed = rng.uniform(size=n) < noise.failed
    masks[failed] = np.roll(masks, 1, axis=0)[failed]  # another image's label: unrelated

    classes = [sorted({int(c) for c in cls[i, : count[i]]}) for i in range(n)]
    return {"images": image, "gt": gt.astype(np.uint8), "masks": masks, "classes": classes, "failed": failed}


def _draw_decoys(rng: np.random.Generator, image: np.ndarray, most: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Paint up to ``most`` blobs of a random shape and colour on each (n, 3, S, S) image, in
    place, before the objects; returns where each is, bool (n, most, S, S)."""
    n, size = image.shape[0], image.shape[-1]
    drawn = np.zeros((n, most, size, size), dtype=bool)
    for j in range(most):
        on = rng.uniform(size=n) < 0.6
        kinds = rng.choice(SHAPE_KINDS[:6], size=n)
        r = rng.uniform(0.08, 0.16, size=n) * size
        centre = rng.uniform(0.1, 0.9, size=(n, 2)) * size
        colour = rng.uniform(20, 255, size=(n, 3))
        for i in np.flatnonzero(on):
            drawn[i, j] = _shape(str(kinds[i]), x - centre[i, 0], y - centre[i, 1], r[i])
            image[i] = np.where(drawn[i, j][None], colour[i, :, None, None], image[i])
    return drawn


def scene_noise(level: str, scene: str) -> Noise:
    """The noise of ``level`` in ``scene``: the rich scene adds its bleed and decoy labels."""
    noise = NOISE_LEVELS[level]
    if scene == "rich":
        bleed, decoy = RICH_BLEED[level]
        noise = replace(noise, bleed=bleed, decoy=decoy)
    return noise


def label_quality(labels: Iterable[np.ndarray], gts: Iterable[np.ndarray]) -> dict[str, float]:
    """Label mIoU against ground truth with 255 counted as a miss, the same with 255 ignored,
    per-class IoU (255 as a miss, ``per_class``, NaN for absent classes), and coverage (share
    of pixels not 255). Classes absent from both truth and labels are
    left out of the mean."""
    hist = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), dtype=np.int64)  # last column: label 255
    pixels = ignored = 0
    for label, gt in zip(labels, gts):
        valid = gt < NUM_CLASSES
        lab = np.where(label[valid] == IGNORE_INDEX, NUM_CLASSES, label[valid]).astype(np.int64)
        hist += np.bincount(gt[valid].astype(np.int64) * (NUM_CLASSES + 1) + lab,
                            minlength=NUM_CLASSES * (NUM_CLASSES + 1)).reshape(hist.shape)
        pixels += label.size
        ignored += int(np.count_nonzero(label == IGNORE_INDEX))
    tp = np.diag(hist[:, :NUM_CLASSES]).astype(np.float64)
    predicted = hist[:, :NUM_CLASSES].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        miss = tp / (hist.sum(axis=1) + predicted - tp)
        ignore = tp / (hist[:, :NUM_CLASSES].sum(axis=1) + predicted - tp)
    return {
        "miou": float(np.nanmean(miss)),
        "per_class": miss,
        "miou_ignore255": float(np.nanmean(ignore)),
        "coverage": 1.0 - ignored / max(pixels, 1),
    }


def write_dataset(out: str | Path, data: dict, prefix: str = "") -> list[str]:
    """The folder format: images/, masks/, gt/ and classes.jsonl; returns the ids."""
    out = Path(out)
    ids = [f"{prefix}{i:05d}" for i in range(len(data["images"]))]
    for i, sample_id in enumerate(ids):
        save_image(out / "images" / f"{sample_id}.png", data["images"][i])
        save_mask(out / "masks" / f"{sample_id}.png", data["masks"][i])
        save_mask(out / "gt" / f"{sample_id}.png", data["gt"][i])
    rows = [{"id": s, "classes": [VOC_CLASSES[c] for c in data["classes"][i]]} for i, s in enumerate(ids)]
    (out / "classes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", choices=list(NOISE_LEVELS), default="harsh")
    parser.add_argument("--look", type=int, default=0, help="0: the fixed look; N: shapes and colours drawn from N")
    parser.add_argument("--scene", choices=list(SCENES), default="plain", help="rich: textures, decoys, thin parts, holes, bleeding labels")
    args = parser.parse_args(argv)
    noise = scene_noise(args.noise, args.scene)
    if args.size % noise.factor:
        parser.error(f"--size must be a multiple of {noise.factor}")
    data = make_dataset(args.n, args.size, args.seed, noise, make_look(args.look), SCENES[args.scene])
    write_dataset(args.out, data)
    q = label_quality(data["masks"], data["gt"])
    per_class = " ".join(f"{VOC_CLASSES[c]} {v:.2f}" for c, v in enumerate(q["per_class"]) if not np.isnan(v))
    print(f"{args.n} samples in {args.out}, noise {args.noise}, look {args.look}, scene {args.scene}: label mIoU {q['miou']:.3f} "
          f"(255 as miss), {q['miou_ignore255']:.3f} (255 ignored), coverage {q['coverage']:.3f}; {per_class}")


if __name__ == "__main__":
    main()
