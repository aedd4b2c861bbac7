"""The bypass benchmark's arithmetic and command line (`throttle.measure.bypass`, `throttle.cli.bypass`):
ratios are taken against the bridge with no netfilter, and both references are printed."""

from __future__ import annotations

import pytest

from throttle.cli.bypass import main
from throttle.lab.layout import SYSCTLS_BRIDGE
from throttle.measure.bypass import BYPASS, NETFILTER, NETFILTER_SWITCHES, PYTHON, REFERENCE, STEPS, Step, report_lines


def steps(reference: float, netfilter: float, bypass: float, python: float = 500e6) -> list[Step]:
    mbit = {REFERENCE: reference, NETFILTER: netfilter, BYPASS: bypass, PYTHON: python}
    return [Step(label, (mbit[i],), 40_000.0 if i == PYTHON else None) for i, label in enumerate(STEPS)]


def test_the_bypassed_ratio_is_against_the_bridge_without_netfilter() -> None:
    # The figures: through netfilter 2,849 Mbit/s, the bypassing censor 4,222. Against the
    # netfilter reference that reads 1.48 and "ok"; against a faster bare bridge it falls short.
    text = "\n".join(report_lines(steps(4500e6, 2849e6, 4222e6)))
    assert "bypassed ratio 0.938 against 1 (target >= 0.95): BELOW TARGET; 1.482 against 2" in text
    assert "references: 4500.0 Mbit/s with no netfilter on the bridge (1, every ratio's base), " \
           "2849.0 Mbit/s through its netfilter hooks (2)" in text
    assert "40,000 packets/s sustained" in text
    ok = "\n".join(report_lines(steps(4000e6, 2849e6, 3900e6)))
    assert "bypassed ratio 0.975 against 1 (target >= 0.95): ok" in ok


def test_each_row_gives_both_ratios_and_the_best_round() -> None:
    rows = steps(4000e6, 2000e6, 3000e6)
    rows[BYPASS] = Step(STEPS[BYPASS], (1000e6, 3000e6, 2000e6), None)
    rows[REFERENCE] = Step(STEPS[REFERENCE], (4000e6, 3500e6, 3900e6), None)
    rows[NETFILTER] = Step(STEPS[NETFILTER], (2000e6, 1900e6, 1800e6), None)
    rows[PYTHON] = Step(STEPS[PYTHON], (500e6, 400e6, 450e6), 40_000.0)
    lines = report_lines(rows)
    row = next(line for line in lines if STEPS[BYPASS] in line)
    assert row.split()[-7:] == ["3000.0", "Mbit/s", "0.750", "1.500", "1000,", "3000,", "2000"]
    assert "best of 3" in lines[1]


def test_only_the_iptables_switches_are_turned_off() -> None:
    assert set(NETFILTER_SWITCHES) == {"net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"}
    assert all(dict(SYSCTLS_BRIDGE)[key] == "1" for key in NETFILTER_SWITCHES)


@pytest.mark.parametrize("argv", [["x"], ["5", "0"], ["5", "2", "9"], ["-1"]])
def test_bad_arguments_print_the_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: bench-bypass [SECONDS [ROUNDS]]" in capsys.readouterr().err
