"""Print the requirements of this project's dependencies and the named extras, one per line.

    python project-requirements.py EXTRA...   (in the folder holding pyproject.toml)

The Dockerfile installs these in a layer of their own before it copies the
project's code, so a code change does not reinstall them. An extra that names
the project itself (`finetune-operator[...]`) cannot be installed before the
project exists: that is an error here, not a silent omission.
"""

import re
import sys
import tomllib


def distribution_name(requirement: str) -> str:
    """The normalised (PEP 503) distribution name of a PEP 508 requirement."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict, extras: list) -> list:
    own_name = distribution_name(project["name"])
    optional = project.get("optional-dependencies", {})
    found = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            sys.exit(f"pyproject.toml: no extra {extra!r} in [project.optional-dependencies]")
        for requirement in optional[extra]:
            if distribution_name(requirement) == own_name:
                sys.exit(f"pyproject.toml: extra {extra!r} requires the project itself ({requirement!r}); "
                         "list its packages in the extra instead")
            found.append(requirement)
    return found


if __name__ == "__main__":
    with open("pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    print("\n".join(requirements(project, sys.argv[1:])))
