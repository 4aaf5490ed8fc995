"""The environment lock: every dependency pinned inside pyproject's range, and a registered
model requires exactly what the lock installs."""

import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from phi3ops.registry.store import pip_requirements
from tests.conftest import REPO


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_every_dependency_within_pyprojects_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked()
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    assert not [v for v in pins.values() if "+" in v], "public-index versions only"


def test_a_registered_model_requires_what_the_lock_installs():
    pins = locked()
    for requirement in pip_requirements():
        name, version = requirement.split("==")
        assert pins[canonicalize_name(name)] == version, requirement
