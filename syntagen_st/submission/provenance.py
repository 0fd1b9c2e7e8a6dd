"""Where a dataset came from: the Stable Diffusion weights, their licence, library versions."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from ..core.config import TINY_MODELS, ModelConfig, is_local_path
from ..core.store import sha256_file

LICENCES = {
    "1.x": "CreativeML OpenRAIL-M",
    "2.x": "CreativeML Open RAIL++-M",
}
DISTRIBUTIONS = ("torch", "torchvision", "diffusers", "transformers", "pytorch-lightning", "numpy", "pillow", "syntagen_st")


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that decide the bytes of a sample, plus Python and our git commit."""
    versions: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    versions["python"] = platform.python_version()
    versions["syntagen_st_commit"] = _git_commit(Path(__file__).resolve().parent)
    return versions


def _git_commit(folder: Path) -> str | None:
    """The commit of a git checkout holding ``folder`` ('+dirty' with local changes), else None."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def folder_weights_sha256(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file of a local diffusers folder (hidden files left out), by relative path."""
    root = Path(folder).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def _hub_cached(repo: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision or "main")
    return Path(found) if isinstance(found, str) else None


def sd_family(cfg: ModelConfig) -> str:
    """'1.x', '2.x' or 'unknown': from the text encoder's config where it can be read (SD 2.x's
    OpenCLIP uses gelu, SD 1.x's CLIP quick_gelu), else from the hub id."""
    if cfg.pretrained in TINY_MODELS:
        return "2.x" if cfg.pretrained == "tiny-sd2" else "1.x"
    if is_local_path(cfg.pretrained):
        config = Path(cfg.pretrained).expanduser() / "text_encoder" / "config.json"
    else:
        config = _hub_cached(cfg.pretrained, "text_encoder/config.json", cfg.revision)
    if config is not None and config.is_file():
        act = json.loads(config.read_text()).get("hidden_act")
        if act in ("gelu", "quick_gelu"):
            return "2.x" if act == "gelu" else "1.x"
    ref = cfg.pretrained.lower()
    if "stable-diffusion-2" in ref or "sd2" in ref:
        return "2.x"
    if "stable-diffusion-v1" in ref or "sd15" in ref or "sd-v1" in ref:
        return "1.x"
    return "unknown"


def model_identity(cfg: ModelConfig) -> dict:
    """The Stable Diffusion weights a run used: hub id + revision (and the cached commit), the
    sha256 of a local folder's files, or the tiny test pipeline."""
    family = sd_family(cfg)
    ident: dict = {"id": cfg.pretrained, "family": family, "licence": LICENCES.get(family)}
    if cfg.pretrained in TINY_MODELS:
        ident["kind"] = "tiny random-initialised test pipeline (not Stable Diffusion weights)"
    elif is_local_path(cfg.pretrained):
        files = folder_weights_sha256(cfg.pretrained)
        ident |= {"kind": "local folder", "files_sha256": files,
                  "sha256": _digest(files)}
    else:
        cached = _hub_cached(cfg.pretrained, "model_index.json", cfg.revision)
        # The hub cache keeps files under snapshots/<commit>/: the commit actually loaded.
        commit = cached.parent.name if cached is not None else None
        ident |= {"kind": "hub", "revision": cfg.revision, "commit": commit}
    return ident


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
