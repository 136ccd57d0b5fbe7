"""Builds are reproducible (issue 16): constraints.txt pins every dependency, and the image,
CI and scripts/setup.sh install through it, so what runs is what the tests passed with."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"


def pins() -> dict[str, str]:
    lines = [line.strip() for line in CONSTRAINTS.read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    for entry in entries:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", entry), f"constraints.txt: not an exact pin: {entry}"
    return {canonicalize_name(e.split("==")[0]): e.split("==")[1] for e in entries}


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_dependency_is_pinned_within_what_pyproject_allows() -> None:
    pinned = pins()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {requirement}"
        )
    assert "delta-push" not in pinned, "the project itself is not a constraint"


def test_this_environment_is_the_pinned_one() -> None:
    """scripts/setup.sh installed through the constraints: the suite tests the pinned versions."""
    for name, pinned in pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # pinned for another extra (load) or platform
        assert installed == pinned, f"{name} {installed} is installed, constraints.txt pins {pinned}"


def test_image_ci_and_setup_install_through_the_constraints() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^COPY [^\n]*constraints\.txt", dockerfile, re.M)
    installs = re.findall(r"pip install[^\n\\]*", dockerfile)
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup and "constraints.txt | sha1sum" in setup, "a new pin re-installs"
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # CI runs setup.sh through test.sh
    assert "scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text()
    assert (ROOT / "scripts" / "refresh-constraints.sh").is_file(), "the documented way to refresh it"
