"""Find the project's resource folders (recipes/, slurm/, seeds/) from a checkout or an install.

In a checkout (including ``pip install -e .``) they are the top-level folders beside
``megatron_sz/``. In a wheel they are shipped as ``megatron_sz/_resources/<name>/``
(see setup.py). The checkout wins when both exist, so editing a recipe in a checkout
takes effect without reinstalling.
"""
from __future__ import annotations

from pathlib import Path

from megatron_sz.errors import UserError

RESOURCES = ("recipes", "slurm", "seeds")
_PKG = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Directory of resource ``name`` (one of RESOURCES)."""
    if name not in RESOURCES:
        raise ValueError(f"unknown resource {name!r}; expected one of {RESOURCES}")
    checkout = _PKG.parent / name
    if (checkout / "README.md").is_file():
        return checkout
    installed = _PKG / "_resources" / name
    if installed.is_dir():
        return installed
    raise UserError(f"resource folder {name!r} not found in {checkout} or {installed}",
                    fix="reinstall megatron-sz (pip install -e .) from a full checkout")


def resolve_resource(path: str | Path, kind: str) -> Path:
    """Resolve a user path; fall back to the packaged resource of that kind.

    ``megatron-sz evolve recipes/local-tiny.yaml`` works from any working directory:
    if the path does not exist as given, ``recipes/local-tiny.yaml`` (or just
    ``local-tiny.yaml``) is looked up in the packaged ``recipes`` folder.
    """
    p = Path(path).expanduser()
    if p.exists():
        return p
    parts = p.parts
    rel = Path(*parts[1:]) if parts and parts[0] == kind else p
    candidate = resource_dir(kind) / rel
    if candidate.exists():
        return candidate
    return p  # let the caller raise its own "not found" naming the original path
