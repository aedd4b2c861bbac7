"""The probe clients with no progress of their own: a scenario's own command, and a headless browser.

Both run in a process group of their own in the client namespace, killed whole at the probe's
timeout (a browser starts helpers), and are judged from what they printed once they exit:

- an upload by the lab server's reply, which the client must show (`{"received": N, "seconds": T}`,
  as `curl -T` prints and the lab server's upload page writes): the server's own count of the body
  and its time to receive it; an upload that shows no reply is a lab failure, never a guess;
- a command's download by its zero exit: the whole transfer in the command's own time (its start-up
  included), or fewer bytes when the last line it prints is a smaller number.

A command (`protocol = "command"`) is a shell command with {url} {host} {address} {file} {size}
{port} filled in, shell-quoted, run with `sh -c`; its `wrap` helper is started first and waited for
until it listens on {port}, and always stopped. The browser (`protocol = "browser"`) is Chromium,
headless, opening the lab server's /upload-page/N, whose script POSTs N random bytes to /upload
while the page loads and writes the server's reply into the page, which --dump-dom prints.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator

from throttle.children import Session, capture
from throttle.errors import ThrottleError
from throttle.kernel.tools import require_tool
from throttle.measure.clients import (CAUSE_COMPLETED, CAUSE_LAB, CAUSE_TIMEOUT, Exit, Outcome, ProbeClient, Setup,
                                      classify_curl, upload_file)
from throttle.scenario import Probe

WRAP_READY = 10.0  # seconds a wrap helper has to start listening
_SERVER_REPLY = re.compile(r'"received":\s*(\d+),\s*"seconds":\s*([\d.]+)')

# Headless Chromium as this machine runs it as root: no sandbox, no GPU, TCP only (the probe is TLS
# over TCP), and no background services, so the probe's flow is the only one. The certificate check
# is off: Chromium reads its own certificate store, not the system bundle that holds the lab CA.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--ignore-certificate-errors")


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def upload_outcome(probe: Probe, out: str, wall: float, missing: str) -> Outcome:
    """An upload judged by the lab server's last reply in `out`; `missing` says why none is there."""
    replies = _SERVER_REPLY.findall(out)
    if not replies:
        return Outcome(CAUSE_LAB, missing, 0, wall)
    received, seconds = int(replies[-1][0]), float(replies[-1][1])
    if received < probe.size:
        return Outcome(CAUSE_LAB, f"the lab server received {received} of {probe.size} bytes", received, wall)
    return Outcome(CAUSE_COMPLETED, "", received, seconds if seconds > 0 else wall)


class _Alone(ProbeClient):
    """Run in a session of its own, killed at the timeout, judged once it exits."""

    crowds = True
    session = True


class CommandClient(_Alone):
    """A command of the scenario's own (`command`), and its `wrap` helper."""

    what = "the command"

    def values(self) -> dict[str, str]:
        """What the placeholders stand for (unquoted)."""
        probe, upload = self.probe, self.upload
        return {
            "url": f"https://{probe.host}/upload" if upload else f"https://{probe.host}/bytes/{probe.size}",
            "host": probe.host,
            "address": self.address,
            "file": str(upload_file(self.setup.workdir, probe.size)) if upload else "",
            "size": str(probe.size),
            "port": str(self.setup.wrap_port),
        }

    def shell(self, template: str) -> list[str]:
        """The command or wrap, its placeholders filled in (shell-quoted), as `sh -c` in the client
        namespace."""
        values = {k: shlex.quote(v) for k, v in self.values().items()}
        return self.setup.exec_argv([require_tool("sh", "dash"), "-c", template.format(**values)])

    def argv(self) -> list[str]:
        return self.shell(self.probe.command)

    @contextlib.contextmanager
    def prepared(self) -> Iterator[str]:
        """The wrap helper listening, while the command runs; always stopped."""
        if not self.probe.wrap:
            yield ""
            return
        with Session(self.shell(self.probe.wrap), "the wrap helper") as helper:
            problem = self._wait_listening(helper, self.setup.wrap_port)
            yield f"the wrap helper {problem}" if problem else ""

    def _wait_listening(self, helper: Session, port: int) -> str:
        """"" once something listens on `port` in the client namespace, else what went wrong."""
        argv = self.setup.exec_argv([require_tool("ss", "iproute2"), "-ltnH", f"sport = :{port}"])
        deadline = time.monotonic() + WRAP_READY
        while time.monotonic() < deadline:
            ended = helper.exited()
            if ended is not None:
                how, _, said = ended.partition(": ")
                return f"{how} before listening on port {port}" + (f": {said}" if said else "")
            try:
                if capture(argv, "ss", timeout=5).out.strip():
                    return ""
            except ThrottleError:
                pass
            time.sleep(0.2)
        return f"did not listen on port {port} within {WRAP_READY:g} s"

    def outcome(self, exit: Exit) -> Outcome:
        probe, wall = self.probe, exit.elapsed
        if exit.killed:
            return Outcome(CAUSE_TIMEOUT, "the command did not finish before its timeout (killed)", 0, wall)
        said = _last_line(exit.err)
        if exit.code != 0:
            words = shlex.split(probe.command)[:1] if probe.command.strip() else []
            if words and os.path.basename(words[0]) == "curl":  # curl's exit codes say why
                cause, detail = classify_curl(exit.code, None, said)
                return Outcome(cause, detail, 0, wall)
            return Outcome(CAUSE_LAB, f"the command exited with {exit.code}" + (f": {said}" if said else ""), 0, wall)
        if self.upload:
            return upload_outcome(probe, exit.out, wall, 'the command did not show the lab server\'s reply '
                                  '{"received": N, ...}, so what the server received is unknown (let it print the '
                                  "reply: curl -T without -o)")
        last = _last_line(exit.out).strip()  # a bare number on its last line is the bytes it received
        if last.isdigit() and int(last) < probe.size:
            return Outcome(CAUSE_LAB, f"the command received {last} of {probe.size} bytes", int(last), wall)
        return Outcome(CAUSE_COMPLETED, "", int(last) if last.isdigit() else probe.size, wall)


class BrowserClient(_Alone):
    """Headless Chromium uploading `size` bytes from the lab server's upload page (uploads only)."""

    what = "the browser"

    def __init__(self, probe: Probe, setup: Setup) -> None:
        super().__init__(probe, setup)
        self.profile = ""  # a fresh user-data-dir for each run

    def argv(self) -> list[str]:
        return self.setup.exec_argv([
            require_tool("chromium", "chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
            f"--host-resolver-rules=MAP * {self.address}",
            "--dump-dom", f"https://{self.probe.host}/upload-page/{self.probe.size}",
        ])

    @contextlib.contextmanager
    def prepared(self) -> Iterator[str]:
        self.profile = tempfile.mkdtemp(prefix="chromium-", dir=self.setup.workdir)
        try:
            yield ""
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def outcome(self, exit: Exit) -> Outcome:
        if exit.killed:
            return Outcome(CAUSE_TIMEOUT, "the browser did not finish before its timeout (killed)", 0, exit.elapsed)
        failed = re.search(r"upload failed[^<]*", exit.out)
        shown = failed.group(0) if failed else "no page"
        if exit.code:
            shown += f" (chromium exited with {exit.code}" + (f": {_last_line(exit.err)})" if exit.err.strip() else ")")
        return upload_outcome(self.probe, exit.out, exit.elapsed, f"the page shows no server reply: {shown}")
