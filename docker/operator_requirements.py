"""Print the operator image's requirements, one per line, from pyproject.toml.

The package's base dependencies serve the trainer too; the operator imports only
``trainer.config`` (pydantic) from it. So the operator needs the base
dependencies minus TRAINER_ONLY, plus the ``operator`` extra. Deriving the list
here (instead of copying it into the Dockerfile) keeps one source of truth.

If pyproject.toml later splits the trainer's heavy dependencies into their own
extra, the operator image can become ``pip install ".[operator]"`` and this
script can go.

Usage: python docker/operator_requirements.py [PYPROJECT]  (default ./pyproject.toml)
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Distributions only the trainer imports (GPU training stack); never in the operator image.
TRAINER_ONLY = frozenset({"torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors"})


def distribution_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def operator_requirements(pyproject: dict) -> list[str]:
    """Base dependencies without TRAINER_ONLY, then the operator extra."""
    project = pyproject["project"]
    base = [r for r in project["dependencies"] if distribution_name(r) not in TRAINER_ONLY]
    extra = project.get("optional-dependencies", {}).get("operator", [])
    self_name = distribution_name(project["name"])
    # An extra may refer to the project itself ("finetune-operator[x]"); that would pull torch back in.
    extra = [r for r in extra if distribution_name(r) != self_name]
    return base + extra


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path("pyproject.toml")
    with path.open("rb") as handle:
        print("\n".join(operator_requirements(tomllib.load(handle))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
