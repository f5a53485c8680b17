"""pyproject.toml and environment.yml pin the same packages at the same versions."""
import re

import tomllib
import yaml


def _pins(specs):
    out = {}
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", spec.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_mirrors_pyproject(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == declared
    assert all("==" in spec for spec in project["dependencies"]), "every runtime dependency is pinned"
