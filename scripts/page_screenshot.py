"""`scripts/page-screenshot`: the README's picture of the live page (docs/page.png), made the way a
class sees it: the lab up, the day-one Twitter censor serving its page, a Twitter photo upload,
a reddit.com upload (caught by the `*t.co*` bug) and a control upload running for `--seconds`,
then headless Chromium's screenshot of the page. Needs root; builds its own lab and takes it down.

    scripts/page-screenshot [--out docs/page.png] [--seconds 45] [--lab pageshot]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throttle.errors import ThrottleError
from throttle.kernel.tools import require_tool
from throttle.lab.topology import Lab
from throttle.measure.page import browser_argv
from throttle.measure.runner import CensorProcess
from throttle.scenario.library import find_scenario

PORT = 19484
UPLOADS = (("pbs.twimg.com", 8 << 20), ("reddit.com", 8 << 20), ("example.org", 0))  # 0: a control that never ends


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/page-screenshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "page.png"))
    p.add_argument("--seconds", type=float, default=45.0, help="how long the uploads run before the picture")
    p.add_argument("--lab", default="pageshot")
    a = p.parse_args(argv)
    lab = Lab(a.lab)
    lab.down()
    uploads: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="page-shot-") as tmp:
        try:
            lab.up([name for name, _ in UPLOADS])
            with CensorProcess(str(find_scenario("twitter-2021-03-10")), lab.ns("censor"),
                               "--metrics-listen", f"127.0.0.1:{PORT}"):
                for name, size in UPLOADS:
                    path = Path(tmp) / name
                    if size:
                        path.write_bytes(os.urandom(size))
                    else:
                        with path.open("wb") as f:
                            f.truncate(64 << 30)  # sparse
                    curl = [require_tool("curl", "curl"), "-4", "-sS", "-o", "/dev/null", "-T", str(path),
                            f"https://{name}/upload"]
                    uploads.append(subprocess.Popen(lab.exec_argv("client", curl), stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL))
                    time.sleep(2)
                time.sleep(a.seconds)
                profile = Path(tmp) / "profile"
                shot = subprocess.run(browser_argv(f"http://127.0.0.1:{PORT}/", str(profile), screenshot=a.out,
                                                   width=1600, height=1000), capture_output=True, text=True,
                                      timeout=120)
                if shot.returncode != 0 or not Path(a.out).exists():
                    raise ThrottleError(f"chromium made no screenshot: {shot.stderr[-1000:]}")
        finally:
            for upload in uploads:
                upload.kill()
                upload.wait()
            lab.down()
            shutil.rmtree(Path(tmp) / "profile", ignore_errors=True)
    print(f"page-screenshot: {a.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ThrottleError as exc:
        print(f"page-screenshot: {exc}", file=sys.stderr)
        sys.exit(2)
