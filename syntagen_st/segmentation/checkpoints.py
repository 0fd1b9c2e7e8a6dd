"""Lightning checkpoints: written atomically beside their target, read without unpickling
arbitrary objects.

A ``.ckpt`` is a pickle: ``torch.load(weights_only=False)`` runs whatever code a crafted file
holds. Ours hold only tensors, containers and plain values (plus Lightning's AttributeDict in
some versions), so they load with ``weights_only=True`` and nothing else is allowed.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.parsing import AttributeDict

from ..core.errors import DAMAGED_FILE_ERRORS, UserError, first_line
from ..core.store import atomic_writer

ALLOWED_GLOBALS = [AttributeDict]
"""The only non-builtin types a syntagen_st training checkpoint may hold."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True``; a one-line UserError when it
    holds any other object (nothing in it is executed) or is not a checkpoint."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = first_line(err, "unsupported object")
        raise UserError(
            f"{path}: refused: the checkpoint holds objects other than tensors and plain values, which "
            f"would run code when loaded ({first[:160]}); give a .safetensors file instead"
        ) from None
    except DAMAGED_FILE_ERRORS as err:
        raise UserError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a training checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer through the project's atomic writer: the temporary file lies
    in the checkpoint's own folder and is renamed over it (Lightning's own stages it in /tmp and
    copies it across file systems, so a full disk left a truncated last.ckpt), with the umask's
    permissions."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_writer(path) as f:
            try:
                torch.save(checkpoint, f)
            except RuntimeError as err:
                # torch's zip writer turns a failed write (a full disk) into "unexpected pos": give the
                # machine's error back, so the command ends in its one line.
                if isinstance(err.__context__, OSError):
                    raise OSError(err.__context__.errno, err.__context__.strerror, str(path)) from None
                raise
