"""python -m loadgen.screenshot --preset small --out loadgen/results/dashboard-small.png

The README's picture of the gateway's dashboard (services/README.md, "Dashboard"): `streamoe up`
on a preset, a shared-prefix load from the load generator (so the prefix cache hits), and, while
the load still runs, the whole page (`/dashboard`) captured by the system's Chromium driven by
Playwright (`pip install playwright`; never `playwright install`).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.launcher.cliargs import positive_float, positive_int
from shared.launcher.redis_server import free_port

from .system import running_system


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.screenshot", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("tiny", "small"), default="small")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--load-s", type=positive_float, default=150.0,
                   help="seconds of load before the capture (the charts' history)")
    p.add_argument("--rate", type=positive_float, default=0.5, help="requests per second")
    p.add_argument("--output-len", type=positive_int, default=32)
    p.add_argument("--port", type=int, default=0, help="the gateway's (default: a free one)")
    p.add_argument("--width", type=positive_int, default=1400, help="the page's width in pixels")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the browser Playwright drives")
    return p


def capture(url: str, out: Path, chromium: str, width: int) -> None:
    """The whole page once it has drawn a few samples; a page error or console error fails it."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/dashboard")
            page.wait_for_function("Number(document.body.dataset.samples) >= 2", timeout=60_000)
            page.wait_for_timeout(1000)  # the charts' last draw
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    if errors:
        raise SystemExit(f"python -m loadgen.screenshot: the page logged errors: {errors}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not Path(args.chromium).exists():
        print(f"python -m loadgen.screenshot: --chromium {args.chromium}: no such file (Debian: apt-get install "
              "chromium)", file=sys.stderr)
        return 2
    port = args.port or free_port()
    vocab = "8192" if args.preset == "small" else "1024"
    with tempfile.TemporaryDirectory(prefix="streamoe-screenshot-") as tmp, \
            running_system("--preset", args.preset, "--port", str(port), "--run-dir", f"{tmp}/run") as url:
        # NOTE: sent until well after the capture, so the page shows a system under load
        load = subprocess.Popen([sys.executable, "-m", "loadgen", "--url", url, "--workload", "shared-prefix",
                                 "--prefix-len", "192", "--num-prefixes", "2", "--input-len", "64",
                                 "--output-len", str(args.output_len), "--vocab-size", vocab,
                                 "--rate", str(args.rate), "--duration", str(args.load_s + 120), "--grace-period", "0",
                                 "--no-progress"], stdout=subprocess.DEVNULL)
        try:
            time.sleep(args.load_s)
            if load.poll() is not None:
                raise SystemExit(f"python -m loadgen.screenshot: the load generator exited with {load.returncode}")
            capture(url, args.out, args.chromium, args.width)
        finally:
            load.terminate()
            load.wait(timeout=60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
