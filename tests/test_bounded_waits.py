"""Issue 12, item 12: no benchmark or test helper waits for ever. A broker that drops messages
once hung `make bench` for 20 minutes without a word; every wait now has a bound and, when it
gives up, says what it saw."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench.common import GaveUpError, wait_until

ROOT = Path(__file__).resolve().parent.parent
WAITING = ("wait", "join", "get", "flush")
BOUNDED = ("deadline", "timeout", "until", "t_end", "budget")


def test_a_wait_gives_up_and_says_what_it_saw() -> None:
    seen = {"messages_in": 4_000}
    with pytest.raises(GaveUpError, match=r"messages to arrive; saw: \{'messages_in': 4000\}"):
        wait_until(lambda: False, 0.2, "messages to arrive", lambda: seen)
    assert wait_until(lambda: True, 0.2, "nothing") < 0.2


def unbounded_waits(path: Path) -> list[str]:
    """``while`` loops that never look at a clock or a deadline, and ``wait()``/``join()``
    calls without a timeout."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.While):
            text = ast.unparse(node).lower()
            looping_on_data = isinstance(node.test, ast.Compare) and not any(
                isinstance(n, ast.Call) for n in ast.walk(node.test))
            if not looping_on_data and not any(b in text for b in BOUNDED) \
                    and "monotonic" not in text and "range(" not in ast.unparse(node.test):
                out.append(f"{path.name}:{node.lineno}: while {ast.unparse(node.test)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("wait", "join") and not node.args and not node.keywords:
            out.append(f"{path.name}:{node.lineno}: {ast.unparse(node)} without a timeout")
    return out


def test_benchmarks_and_the_fault_rig_bound_every_wait() -> None:
    files = [*sorted((ROOT / "bench").glob("*.py")), ROOT / "tests" / "rig.py"]
    found = [w for f in files for w in unbounded_waits(f)]
    assert not found, "\n".join(found)
