"""The import direction of the layout: devices <- edge, cloud, simulators; edge never imports
cloud; nothing in the agent's packages imports the cloud's third-party clients."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"devices", "edge", "cloud", "simulators", "fieldline"}
ALLOWED = {
    "devices": set(),
    "edge": {"devices"},
    "cloud": {"devices"},
    "simulators": {"devices"},
    "fieldline": OURS,
}
CLOUD_ONLY_DEPS = {"aiomqtt", "influxdb_client", "grafana_client"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_the_layout_allows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        ours = imports_of(f) & OURS - {package}
        bad = ours - ALLOWED[package]
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("package", ["devices", "edge", "simulators"])
def test_edge_side_never_imports_cloud_clients(package: str) -> None:
    for f in sorted((ROOT / package).rglob("*.py")):
        bad = imports_of(f) & CLOUD_ONLY_DEPS
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_edge_agent_imports_without_cloud_dependencies_installed() -> None:
    """Start the agent's modules with aiomqtt/influxdb_client/grafana_client made unimportable."""
    code = (
        "import sys\n"
        "for m in ('aiomqtt', 'influxdb_client', 'grafana_client'):\n"
        "    sys.modules[m] = None\n"
        "import edge.agent, edge.config, simulators.publisher\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
