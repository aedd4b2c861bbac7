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
until it listens on {port}, and always stopped.

The browser (`protocol = "browser"`) is Chromium, headless, opening the lab server's
/upload-page/N, whose script POSTs N random bytes to /upload while the page loads and writes the
server's reply into the page, which --dump-dom prints; or /download-page/N, whose script GETs
/bytes/N and writes the bytes the page received and the time they took, in the same form. With
`http3 = true` it loads the page, and moves the bytes, over HTTP/3 from the lab's HTTP/3 server
(`lab.h3`), QUIC forced for the probe's host from the first request, and the certificate accepted
by the lab's leaf key (`lab.ca.leaf_spki`): Chromium's QUIC ignores --ignore-certificate-errors.
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

# Headless Chromium as this machine runs it as root: no sandbox, no GPU, and no background services,
# so the probe's flow is the only one.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps")
# Over TCP: TLS only (no QUIC), and the certificate check off: Chromium reads its own certificate
# store, not the system bundle that holds the lab CA.
CHROMIUM_TCP = ("--disable-quic", "--ignore-certificate-errors")


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def upload_outcome(probe: Probe, out: str, wall: float, missing: str, receiver: str = "the lab server") -> Outcome:
    """An upload judged by the lab server's last reply in `out` (a browser's download: by the page's
    line of the same form); `missing` says why none is there."""
    replies = _SERVER_REPLY.findall(out)
    if not replies:
        return Outcome(CAUSE_LAB, missing, 0, wall)
    received, seconds = int(replies[-1][0]), float(replies[-1][1])
    if received < probe.size:
        return Outcome(CAUSE_LAB, f"{receiver} received {received} of {probe.size} bytes", received, wall)
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
    """Headless Chromium uploading or downloading `size` bytes through the lab server's page, over
    TCP, or over HTTP/3 (`http3`)."""

    what = "the browser"

    def __init__(self, probe: Probe, setup: Setup) -> None:
        super().__init__(probe, setup)
        self.profile = ""  # a fresh user-data-dir for each run
        self.spki = ""  # over HTTP/3: the lab's leaf key, which its certificates carry

    @property
    def page(self) -> str:
        return f"https://{self.probe.host}/{self.probe.direction}-page/{self.probe.size}"

    def argv(self) -> list[str]:
        address = f"[{self.address}]" if ":" in self.address else self.address
        if self.probe.http3:
            # QUIC for the probe's host from the first request (no TCP first, no Alt-Svc, no fallback)
            transport: tuple[str, ...] = (f"--origin-to-force-quic-on={self.probe.host}:443",
                                          f"--ignore-certificate-errors-spki-list={self.spki}")
        else:
            transport = CHROMIUM_TCP
        return self.setup.exec_argv([
            require_tool("chromium", "chromium"), *CHROMIUM_FLAGS, *transport, f"--user-data-dir={self.profile}",
            f"--host-resolver-rules=MAP * {address}", "--dump-dom", self.page,
        ])

    @contextlib.contextmanager
    def prepared(self) -> Iterator[str]:
        if self.probe.http3:
            if self.setup.ca_dir is None:
                yield "the lab's CA directory is not known, so the browser cannot be told its key (HTTP/3)"
                return
            from throttle.lab.ca import CAFiles, leaf_spki  # cryptography: only where a key is read

            try:
                self.spki = leaf_spki(CAFiles.in_dir(self.setup.ca_dir))
            except (OSError, ValueError, ThrottleError) as exc:
                yield f"the lab's leaf key could not be read: {exc}"
                return
        self.profile = tempfile.mkdtemp(prefix="chromium-", dir=self.setup.workdir)
        try:
            yield ""
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def outcome(self, exit: Exit) -> Outcome:
        if exit.killed:
            return Outcome(CAUSE_TIMEOUT, "the browser did not finish before its timeout (killed)", 0, exit.elapsed)
        failed = re.search(r"(?:upload|download) failed[^<]*", exit.out)
        shown = failed.group(0) if failed else "no page"
        if exit.code:
            shown += f" (chromium exited with {exit.code}" + (f": {_last_line(exit.err)})" if exit.err.strip() else ")")
        if self.upload:
            return upload_outcome(self.probe, exit.out, exit.elapsed, f"the page shows no server reply: {shown}")
        return upload_outcome(self.probe, exit.out, exit.elapsed, f"the page shows no result: {shown}", "the page")
