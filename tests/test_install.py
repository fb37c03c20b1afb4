"""The install stays what CI tested: constraints.txt pins every requirement within requirements.txt's ranges, and the
environment the tests run in has exactly the pinned versions (scripts/setup.sh installs with them)."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def lines(name: str) -> list[str]:
    text = (REPO / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in text if line.split("#")[0].strip()]


def pins() -> dict[str, Version]:
    pinned = {}
    for line in lines("constraints.txt"):
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"constraints.txt: {line!r} must pin one version (==)"
        pinned[canonicalize_name(requirement.name)] = Version(spec.version)
    return pinned


def test_every_requirement_is_pinned_within_its_range() -> None:
    pinned = pins()
    for line in lines("requirements.txt"):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"requirements.txt names {name}, unpinned in constraints.txt: bash scripts/lock.sh"
        assert requirement.specifier.contains(pinned[name]), f"constraints.txt: {name}=={pinned[name]} is not {line!r}"


def test_the_environment_has_the_pinned_versions() -> None:
    wrong = {}
    for name, pinned in pins().items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            wrong[name] = (str(pinned), "missing")
            continue
        if Version(installed.public) != pinned:  # torch's +cpu names the wheel's build
            wrong[name] = (str(pinned), str(installed))
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}"
