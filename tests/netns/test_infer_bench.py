"""`scripts/bench-infer --reduced` in CI: the lab as ground truth for `throttle infer`, every
accuracy target of issue 21 met on the reduced grid (accuracies, never timings). Its own lab;
about 14 runs of 10-30 s each (see the report for the measured time)."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest

from tests.conftest import ROOT, lab_name

pytestmark = pytest.mark.netns


def bench_infer() -> ModuleType:
    """scripts/bench_infer.py as a module (scripts/ is not a package: put on the path for this)."""
    scripts = str(ROOT / "scripts")
    sys.path.insert(0, scripts)
    try:
        return importlib.import_module("bench_infer")
    finally:
        sys.path.remove(scripts)


def test_reduced_grid_meets_the_accuracy_targets() -> None:
    from tests.netns.conftest import require_lab_prerequisites

    require_lab_prerequisites()
    bench = bench_infer()
    result = bench.bench(bench.reduced_grid(), lab_name("binfer"), lambda text: print(text, flush=True))
    print("\n" + bench.report(result))
    assert not result["skipped"], f"cases skipped for lab features this checkout lacks: {result['skipped']}"
    assert not result["errors"], result["errors"]
    met = bench.verdicts(result)
    assert all(met.values()), {k: (result[k], bench.TARGETS[k]) for k, ok in met.items() if not ok}
