"""The pinned installs: the environment under test holds the pins, the pins satisfy pyproject.toml's
ranges, and docs/installs.md shows what they hold."""
from __future__ import annotations

import importlib.util
import re
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")
REQUIREMENTS = ROOT / "requirements"
PIN_SETS = {".venv": REQUIREMENTS / "pins.txt", ".venv-oldest": REQUIREMENTS / "pins-oldest.txt"}
NOT_PINNED = {"roletune", "pip"}  # the project itself, and the installer
# What the gguf extra adds to the test environment: make test-slow installs it (pip compiles llama.cpp), make test
# and make test-oldest do not.
GGUF_ONLY = {"llama-cpp-python", "diskcache"}

spec = importlib.util.spec_from_file_location("freeze", REQUIREMENTS / "freeze.py")
freeze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(freeze)


def pyproject_requirements() -> list[Requirement]:
    """What make installs: the dependencies and the extras, the gguf one included (make test-slow adds it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = re.search(r"^GGUF_EXTRAS := (.*)$", (ROOT / "Makefile").read_text(), re.M)[1].split(",")
    names = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in names]


def test_the_environment_under_test_holds_exactly_the_pins():
    venv = Path(sys.prefix).resolve()
    if venv.parent != ROOT or venv.name not in PIN_SETS:
        pytest.skip(f"{venv} is not one of the pinned environments (make test-latest, or your own install)")
    pins = freeze.read_pins(PIN_SETS[venv.name])
    # The venv's own site-packages only: setuptools puts the packages it vendors on sys.path once imported.
    site = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    installed = {freeze.normalize(d.metadata["Name"]): d.version.split("+")[0] for d in distributions(path=site)}
    for name in NOT_PINNED:
        installed.pop(name, None)
    if "llama-cpp-python" not in installed:
        pins = {name: version for name, version in pins.items() if name not in GGUF_ONLY}
    assert installed == pins


@pytest.mark.parametrize("pin_set", sorted(PIN_SETS.values()), ids=lambda path: path.name)
def test_the_pins_satisfy_the_ranges_users_install_from(pin_set):
    pins = freeze.read_pins(pin_set)
    for requirement in pyproject_requirements():
        name = freeze.normalize(requirement.name)
        assert name in pins, f"{pin_set.name} does not pin {name}"
        assert requirement.specifier.contains(pins[name]), f"{pin_set.name}: {name}=={pins[name]} not in {requirement}"
        for extra in requirement.extras:  # swanlab[dashboard]: what the extra brings is pinned too
            assert all(freeze.normalize(r.name) in pins for r in extra_requirements(requirement.name, extra))
    assert not [version for version in pins.values() if "+" in version], "versions carry no build label"


def extra_requirements(package: str, extra: str) -> list[Requirement]:
    from importlib.metadata import requires

    marker_extra = re.compile(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]")
    return [Requirement(r.split(";")[0]) for r in requires(package) or () if marker_extra.search(r)]


def test_the_oldest_pins_hold_the_oldest_transformers_pyproject_accepts():
    oldest = re.search(r"^OLDEST := transformers==(\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    transformers = next(r for r in pyproject_requirements() if r.name == "transformers")
    lowest = min(s.version for s in transformers.specifier if s.operator == ">=")
    assert freeze.read_pins(PIN_SETS[".venv-oldest"])["transformers"] == oldest
    assert Version(oldest) == Version(lowest)
    assert freeze.read_pins(PIN_SETS[".venv"])["transformers"] != oldest


def test_docs_show_the_versions_the_pins_hold():
    doc = (ROOT / "docs" / "installs.md").read_text(encoding="utf-8")
    assert freeze.table(*PIN_SETS.values()) in doc, "docs/installs.md is out of date: `make pins` writes its table"
