"""`throttle demo`: the bundled demonstration.

Live (the default, needs root): the `twitter-2021-03-10` scenario in the lab, with a Twitter
photo upload, a reddit.com upload caught by the `*t.co*` bug and a control upload side by side,
their speeds redrawn every second for about a minute, then the table. The control upload is
repeated meanwhile, so its speed stays on screen and in the Prometheus exporter.

Web (`--web`, needs root): the lab up and the same censor running until Ctrl-C, with the URL of
its live page (measure.page) for a projector and the command that opens the lab server's upload
page in a browser in the client's namespace, so a class can try names and evasions; the censor
stopped and the lab taken down (if this command brought it up) on Ctrl-C or SIGTERM.

Offline (`--offline`, no root): a capture of nine real connections (curl, openssl, Python and
Chromium talking TLS to a lab server; see tests/vectors/README.md) is run through three censors,
and a table shows which connections each would have throttled and why.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import typer

from throttle.cli.options import DEFAULT_LAB, lab_option, metrics_option
from throttle.cli.output import format_table
from throttle.engine.offline import FlowReport, classify_file
from throttle.errors import ThrottleError
from throttle.extras import require
from throttle.scenario import Probe, Scenario, load_scenario
from throttle.scenario.library import bundled_path

DEMO_CAPTURE = "demo.pcap"  # in the package's data folder


def _models() -> list[tuple[str, Scenario]]:
    day_one = load_scenario(bundled_path("twitter-2021-03-10"))
    fixed = load_scenario(bundled_path("twitter-2021-04-02"))
    modern = dataclasses.replace(day_one, model=dataclasses.replace(day_one.model, reassemble=True))
    return [("2021-03-10", day_one), ("2021-04-02", fixed), ("reassembling", modern)]


def _cell(r: FlowReport) -> str:
    return "THROTTLED" if r.verdict == "limited" else "-"


DEMO_SIZE = 960 * 1024  # about a minute at 130 kbit/s


def live_probes(scenario: Scenario) -> tuple[Probe, ...]:
    return (
        Probe(name="twitter-photo", host="pbs.twimg.com", direction="upload", size=DEMO_SIZE, expect="throttled"),
        Probe(name="reddit-upload", host="reddit.com", direction="upload", size=DEMO_SIZE, expect="throttled"),
        Probe(name="control", host="example.org", direction="upload", size=DEMO_SIZE, expect="normal", control=True),
    )


def run_live_demo(lab_name: str = "throttle") -> int:
    from throttle.cli.views import Progress, footnote, result_table, stdout_console
    from throttle.measure.runner import run_scenario

    scenario = load_scenario(bundled_path("twitter-2021-03-10"))
    scenario = dataclasses.replace(scenario, probes=live_probes(scenario))
    out = stdout_console()
    out.print(f"[bold]throttle demo[/bold]: Russia slows Twitter, 2021-03-10. Three uploads of "
              f"{DEMO_SIZE // 1024} KB from the lab's client, through a censor that reads the TLS server name.")
    progress = Progress("speeds now (updated every second)")
    with progress.shown():
        report = run_scenario(scenario, lab_name=lab_name, on_update=progress.update, on_phase=progress.phase,
                              busy_controls=True)
    out.print(result_table(report))
    out.print(footnote(report), style="dim", highlight=False)
    explanation = (
        'pbs.twimg.com matched *.twimg.com; reddit.com matched *t.co* ("reddi[t.co]m"), the substring bug '
        "of the first day; example.org matched nothing and went at full speed.\n"
        "Next: throttle scenarios list · throttle run twitter-2021-04-02 · throttle demo --offline"
    )
    out.print(explanation, markup=False, highlight=False)
    return 0 if report.passed else 1


WEB_NAMES = ("pbs.twimg.com", "twitter.com", "reddit.com", "example.org")  # certificates made at start


def web_demo_lines(lab_name: str, listen: str) -> list[str]:
    """What `demo --web` tells the class: the page's URL and what to try."""
    addr, _, port = listen.rpartition(":")
    shown = addr if addr not in ("", "0.0.0.0", "::", "[::]") else "127.0.0.1"
    lab = "" if lab_name == DEFAULT_LAB else f" --lab {lab_name}"
    return [
        f"the live page: http://{shown}:{port}/  (open it on the projector; Pause freezes the picture)",
        "upload a photo from the lab's client in a real browser (a window appears on your display):",
        f"  sudo throttle lab exec{lab} -- chromium --no-sandbox --user-data-dir=/tmp/throttle-class "
        "--ignore-certificate-errors https://pbs.twimg.com/photo",
        "  then https://example.org/photo in the same window: the bar crawls for the first, flies for the second",
        f"or from a terminal: sudo throttle lab exec{lab} -- curl -T 1MB.jpg https://reddit.com/upload",
        "Ctrl-C stops the censor and takes the lab down",
    ]


def run_web_demo(lab_name: str, listen: str | None, say: Callable[[str], None]) -> int:
    """The lab and the day-one censor, up until Ctrl-C or SIGTERM; the page's URL said first."""
    from throttle.censor import DEFAULT_METRICS
    from throttle.lab.topology import Lab
    from throttle.measure.runner import CensorProcess

    listen = listen or DEFAULT_METRICS
    if listen == "off":
        raise ThrottleError("demo --web shows the censor's page on its metrics address: give ADDR:PORT, not off")
    scenario_path = str(bundled_path("twitter-2021-03-10"))
    lab = Lab(lab_name)
    was_up = lab.status().up
    say("reusing the running lab" if was_up else f"bringing the lab {lab_name} up")
    lab.up(WEB_NAMES)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with CensorProcess(scenario_path, lab.ns("censor"), "--metrics-listen", listen) as censor:
            say("censor on: Russia slows Twitter, 2021-03-10 (SNI policing at 130 kbit/s)")
            for line in web_demo_lines(lab_name, listen):
                say(line)
            while censor.poll() is None:
                time.sleep(1.0)
            raise ThrottleError(f"the censor stopped by itself (exit {censor.poll()}): {censor.tail.strip()}")
    except KeyboardInterrupt:
        say("stopping")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not was_up:
            say("taking the lab down")
            lab.down()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the class as Ctrl-C does: censor stopped, lab down


def run_demo(capture: Path | None = None) -> int:
    capture = capture or Path(str(resources.files("throttle") / "data" / DEMO_CAPTURE))
    models = _models()
    results = [classify_file(capture, scenario) for _, scenario in models]
    typer.secho("throttle demo: which connections would a Twitter-throttling censor slow down?", bold=True)
    typer.echo(f"capture: {capture} (real curl, openssl, Python and Chromium connections)\n")
    rows = []
    for i, flow in enumerate(results[-1]):
        name = flow.name or ("(no SNI)" if flow.server.endswith(":443") else "(plain HTTP)")
        rows.append([str(i + 1), name, flow.server] + [_cell(r[i]) for r in results])
    header = ["#", "name in the hello", "server"] + [label for label, _ in models]
    typer.echo(format_table(header, rows))
    typer.echo(
        "\n2021-03-10    the first day: *t.co* was a substring match, so www.microsoft.com and\n"
        "              reddit.com were slowed too; only the first TCP segment was read, so\n"
        "              Chromium's two-segment ClientHello (post-quantum key share) slipped through.\n"
        "2021-04-02    the fixed patterns: microsoft.com and reddit.com are free again.\n"
        "reassembling  a censor that joins TCP segments: Chromium is caught as well.\n"
        "No SNI and plain HTTP are never slowed: only the TLS server name counts (incidents §1.3).\n"
        "\nTry it on your own capture:  throttle classify FILE.pcap --scenario twitter-2021-03-10"
    )
    return 0


def demo(
    offline: bool = typer.Option(False, "--offline", help="No lab, no root: classify a bundled capture instead."),
    web: bool = typer.Option(False, "--web", help="Keep the lab and the censor up until Ctrl-C, and print the URL "
                             "of the censor's live page, for a class to watch and try names."),
    lab_name: str = lab_option(),
    metrics_listen: str | None = metrics_option(),
) -> None:
    """The demonstration: Twitter slowed live in the lab, about a minute (needs root and the [live]
    extra). `--web`: the lab and censor stay up with a live page until Ctrl-C. `--offline`: the
    same censors on a bundled capture, anywhere, no root."""
    if offline:
        raise typer.Exit(run_demo())
    require("live", "throttle demo (live; --offline needs nothing)")
    if web:
        raise typer.Exit(run_web_demo(lab_name, metrics_listen, typer.echo))
    raise typer.Exit(run_live_demo(lab_name))
