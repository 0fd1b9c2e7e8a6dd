"""The segmentation network without Lightning: build it, load weights into it, save it, predict.

Refinement, evaluation and export use these alone; ``segmodel`` wraps the network for training.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import torchvision
from torch import nn

from ..core.classes import NUM_CLASSES
from ..core.errors import DAMAGED_FILE_ERRORS, UserError
from ..core.store import atomic_write_bytes, atomic_write_text, sha256_file
from .data import eval_transform, load_image

METADATA_KEY = "syntagen_st"
AUX_ARCHS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large")
LOAD_ERRORS = (*DAMAGED_FILE_ERRORS, safetensors.SafetensorError)
"""What a damaged or foreign weights file raises while it is read."""


# ---------------------------------------------------------------- building


def build_segmenter(arch: str, backbone_weights: str = "none", num_classes: int = NUM_CLASSES, aux: bool | None = None) -> nn.Module:
    """A torchvision segmentation model; backbone from 'imagenet', a local file, or random ('none').

    The caller warns about 'none' where it is a user's choice (see segmodel.SegModule); loading
    final weights builds with 'none' on purpose.
    """
    aux = arch in AUX_ARCHS if aux is None else aux
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes, "weights_backbone": None}
    if arch in AUX_ARCHS:
        kwargs["aux_loss"] = aux
    if backbone_weights == "imagenet":
        kwargs["weights_backbone"] = "IMAGENET1K_V1"
    try:
        model = torchvision.models.get_model(arch, **kwargs)
    except OSError as err:  # urllib's URLError is an OSError: no network, no cached weights
        raise UserError(
            f"could not get the ImageNet backbone weights for {arch} ({err}); set train.backbone_weights "
            "to a local state-dict file, or 'none'"
        ) from None
    if backbone_weights not in ("imagenet", "none"):
        load_backbone_weights(model, backbone_weights)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as err:
        raise UserError(f"{path}: unreadable weights file ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):  # checkpoints that wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def load_backbone_weights(model: nn.Module, path: str | Path) -> int:
    """Load a classification network's state dict (e.g. torchvision resnet50) into model.backbone.

    Keys are matched by suffix, so 'conv1.weight', 'backbone.conv1.weight', 'module.conv1.weight'
    and MobileNet's 'features.0.0.weight' all work; the classifier head (fc.*) is left out.
    Returns the number of tensors loaded; every backbone tensor must be found.
    """
    path = Path(path).expanduser()
    state = _read_state_dict(path)
    target = model.backbone.state_dict()
    first = next(iter(target))
    prefixes = [k[: -len(first)] for k in state if k.endswith(first) and (len(k) == len(first) or k[-len(first) - 1] == ".")]
    for prefix in prefixes:
        if all(prefix + k in state for k in target):
            break
    else:
        raise UserError(f"{path}: does not hold the {type(model.backbone).__name__} backbone of this model (no key ends in {first!r} with all the others)")
    picked = {k: state[prefix + k] for k in target}
    for key, value in picked.items():
        if value.shape != target[key].shape:
            raise UserError(f"{path}: {prefix + key} has shape {tuple(value.shape)}, the backbone needs {tuple(target[key].shape)}")
    model.backbone.load_state_dict(picked, strict=True)
    return len(picked)


# ---------------------------------------------------------------- final weights


def save_weights(model: nn.Module, path: str | Path, arch: str) -> str:
    """Write the model's state dict as safetensors (atomically) and return its sha256.

    The same weights always give the same bytes (the checksum is what a team submits):
    safetensors writes its metadata map in a random order, so it gets a single entry.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {"arch": arch, "num_classes": NUM_CLASSES, "aux": getattr(model, "aux_classifier", None) is not None}
    metadata = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))
    return sha256_file(path)


def write_checksum(weights: Path) -> str:
    """``<sha256>  <name>`` in checksum.txt beside the weights (the format of ``sha256sum -c``)."""
    digest = sha256_file(weights)
    atomic_write_text(weights.parent / "checksum.txt", f"{digest}  {weights.name}\n")
    return digest


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, str]:
    """The network of a Lightning checkpoint written by SegModule, and its arch."""
    from .checkpoints import read_checkpoint  # Lightning's types: only a .ckpt needs them

    path = Path(path)
    ckpt = read_checkpoint(path)
    try:
        arch = ckpt["hyper_parameters"]["train"]["arch"]
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path}: not a syntagen_st training checkpoint ({type(err).__name__}: {err})") from err
    model = build_segmenter(arch, "none", aux=any(k.startswith("aux_classifier.") for k in state))
    model.load_state_dict(state)
    return model, arch


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A model in eval mode from final weights (.safetensors) or a training checkpoint (.ckpt)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
            state = safetensors.torch.load_file(str(path))
        except (*LOAD_ERRORS, json.JSONDecodeError) as err:
            raise UserError(f"{path}: unreadable safetensors file ({type(err).__name__}: {err})") from err
        if "arch" not in meta:
            raise UserError(f"{path}: no {METADATA_KEY!r} metadata with the arch; not written by syntagen_st")
        model = build_segmenter(meta["arch"], "none", aux=bool(meta.get("aux")))
        model.load_state_dict(state)
    else:
        model, _ = model_from_checkpoint(path)
    return model.to(device).eval()


# ---------------------------------------------------------------- prediction


def _as_array(image: str | Path | np.ndarray) -> np.ndarray:
    return image if isinstance(image, np.ndarray) else load_image(image)


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: Iterable[str | Path | np.ndarray], batch_size: int = 8,
    device: str | torch.device | None = None, flip: bool = False,
) -> Iterator[np.ndarray]:
    """Softmax probabilities (21, H, W) float32 per image, at each image's own resolution.

    Consecutive images of equal size are batched; images are paths or (H, W, 3) uint8 arrays.
    With ``flip`` each is the mean of the softmax of the image and, flipped back, of its
    horizontal mirror (the batch is the same, so its results do not depend on the sharding).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    transform = eval_transform()
    pending: list[torch.Tensor] = []

    def flush() -> Iterator[np.ndarray]:
        x = torch.stack(pending).to(device)
        pending.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            probs = model(x)["out"].float().softmax(1)
            if flip:
                probs = (probs + model(x.flip(-1))["out"].float().softmax(1).flip(-1)) / 2
        yield from probs.cpu().numpy()

    for image in images:
        x = transform(image=_as_array(image))["image"]
        if pending and (x.shape != pending[0].shape or len(pending) == batch_size):
            yield from flush()
        pending.append(x)
    if pending:
        yield from flush()

