"""Screenshots of the teaching app: Voila serves notebook 14 and headless Chromium captures each widget.

Used by ``tests/test_browser.py`` and ``python -m rearlib teaching screenshots``: :func:`serve_voila` serves a
notebook with Voila on 127.0.0.1 and always kills it; :func:`chromium_page` opens a headless Debian Chromium through
Playwright (never ``playwright install``); :func:`take_screenshots` saves a PNG of each widget.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from rearlib.experiments.notebook import NOTEBOOK_DIR

from .render import _REPLACEMENT_LABELS
from .widgets import ARvsReAR, SameCTR, TokenSurgery

#: Chromium flags for CI and sandboxes (no GPU, no network chatter, runs as root).
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run")


def find_chromium() -> str | None:
    """``$REARLIB_CHROMIUM``, else Debian's ``chromium`` on PATH (``apt-get install chromium``), else None."""
    env = os.environ.get("REARLIB_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


@contextlib.contextmanager
def chromium_page(executable: str | None = None, *, width: int = 1500, height: int = 1100,
                  timeout_ms: int = 60_000):
    """A Playwright page in headless Chromium (the system binary; Playwright downloads nothing). Closed after."""
    # Playwright is an optional (dev) dependency, needed only here.
    from playwright.sync_api import sync_playwright

    exe = executable or find_chromium()
    if exe is None:
        raise FileNotFoundError("Chromium not found: install Debian's package (apt-get install chromium) or set "
                                "REARLIB_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS), timeout=timeout_ms)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_parameters(script: Path, params: dict, out: Path) -> Path:
    """Write ``script`` (jupytext .py or .ipynb) as a notebook whose parameters cell ends with ``params``."""
    # jupytext takes seconds to import and only this helper needs it.
    import jupytext

    nb = jupytext.read(script)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if params and not cells:
        raise ValueError(f"{script} has no cell tagged 'parameters'")
    if params:
        cells[0].source += "\n# overrides\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, out, fmt="ipynb")
    return out


@contextlib.contextmanager
def serve_voila(script, params: dict | None = None, *, timeout_s: float = 90.0, log_path=None):
    """Serve ``script`` (with ``params`` appended to its parameters cell) with Voila on 127.0.0.1 at a free port.

    Yields ``(url, log_tail)`` once the server answers: the notebook's URL and a function returning the end of
    the server's log (for error messages). The server runs in its own process group (its kernels are
    children); on exit that group is sent SIGTERM, then SIGKILL after 10 s - always, even on errors. Raises
    RuntimeError with the server log's tail if it exits or does not answer within ``timeout_s``.
    """
    script = Path(script).resolve()
    work = Path(tempfile.mkdtemp(prefix="rearlib-voila-"))
    nb = _with_parameters(script, params or {}, work / (script.stem + ".ipynb"))
    port = _free_port()
    log_file = Path(log_path) if log_path else work / "voila.log"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "voila", str(nb.name), f"--port={port}", "--no-browser", "--Voila.ip=127.0.0.1",
           "--show_tracebacks=True", "--ServerApp.token=", "--ServerApp.password="]
    log = open(log_file, "wb")
    proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def tail() -> str:
        log.flush()
        return log_file.read_text(errors="replace")[-3000:]

    try:
        base = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"voila exited with status {proc.returncode}:\n{tail()}")
            try:  # any HTTP answer means the server is up ("/" itself would start the notebook's kernel)
                with urllib.request.urlopen(base + "api/status", timeout=2):
                    break
            except urllib.error.HTTPError:
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"voila did not answer within {timeout_s:.0f} s:\n{tail()}")
            time.sleep(0.3)
        yield base, tail  # Voila serving one notebook renders it at the root
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Kernels started by the server share its process group; make sure none outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if log_path is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for p in work.iterdir():
                if p != log_file:
                    p.unlink(missing_ok=True)


def wait_for_widgets(page, css_class: str, timeout_ms: int = 120_000):
    """Wait until the widget with ``css_class`` has rendered images with content; returns its locator."""
    loc = page.locator(f".{css_class}")
    loc.first.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function(
        "cls => { const imgs = document.querySelectorAll('.' + cls + ' img');"
        " return imgs.length > 0 && Array.from(imgs).every(i => i.complete && i.naturalWidth > 0); }",
        arg=css_class, timeout=timeout_ms)
    return loc.first


def image_digest(page, selector: str) -> tuple[str, str]:
    """(src, sha1 of the bytes behind it) of the first <img> matching ``selector``. The widget's blob URL is read
    and fetched inside the page in one step, retried while an update revokes the URL between the two."""
    return tuple(page.evaluate(
        """async sel => {
             for (let attempt = 0; attempt < 20; attempt++) {
               const img = document.querySelector(sel);
               const src = img ? (img.getAttribute('src') || '') : '';
               try {
                 const b = await (await fetch(src)).arrayBuffer();
                 const h = await crypto.subtle.digest('SHA-1', b);
                 return [src, Array.from(new Uint8Array(h)).map(x => x.toString(16).padStart(2, '0')).join('')];
               } catch (e) {
                 await new Promise(r => setTimeout(r, 100));
               }
             }
             throw new Error('could not read the image behind ' + sel);
           }""", selector))


def take_screenshots(out_dir, *, script=None, timeout_s: float = 240.0) -> list[Path]:
    """Serve notebook 14 with Voila (no headless demo), click a few token cells, and save a PNG of each widget
    into ``out_dir`` (``teaching_surgery.png``, ``teaching_same_ctr.png``, ``teaching_ar_vs_rear.png``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    script = Path(script) if script else NOTEBOOK_DIR / "14_teaching.py"
    work = Path(tempfile.mkdtemp(prefix="rearlib-shots-"))
    params = {"run_demo": False, "reports_dir": str(work / "reports"), "figures_dir": str(work / "figures")}
    written = []
    try:
        with serve_voila(script, params, timeout_s=timeout_s) as (url, _tail), chromium_page() as page:
            page.goto(url, timeout=int(timeout_s * 1000))
            for css in (TokenSurgery.css_class, SameCTR.css_class, ARvsReAR.css_class):
                wait_for_widgets(page, css, int(timeout_s * 1000))
            # A diagonal stroke of clicked cells replaced by far codes, so the screenshot shows the clickable grid in
            # use and visible damage at a CTR of 97%.
            before = image_digest(page, f".{TokenSurgery.css_class}-decoded")[1]
            page.locator(f".{TokenSurgery.css_class}-replacement select").first.select_option(
                label=_REPLACEMENT_LABELS["farthest"])
            _wait_digest_change(page, f".{TokenSurgery.css_class}-decoded", before, 30.0)
            cells = page.locator(f".{TokenSurgery.css_class}-grid .rearlib-cell")
            w = int(round(math.sqrt(cells.count())))
            for i in [(r * w + c) for r, c in ((3, 4), (3, 5), (4, 5), (4, 6), (5, 6), (5, 7), (6, 7))]:
                before = image_digest(page, f".{TokenSurgery.css_class}-decoded")[1]
                cells.nth(i).click()
                _wait_digest_change(page, f".{TokenSurgery.css_class}-decoded", before, 30.0)
            for css, name in ((TokenSurgery.css_class, "teaching_surgery.png"),
                              (SameCTR.css_class, "teaching_same_ctr.png"),
                              (ARvsReAR.css_class, "teaching_ar_vs_rear.png")):
                path = out / name
                page.locator(f".{css}").first.screenshot(path=str(path))
                written.append(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return written


def _wait_digest_change(page, selector: str, before: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = image_digest(page, selector)[1]
        if d != before:
            return d
        time.sleep(0.1)
    raise TimeoutError(f"{selector} did not change within {timeout_s:.0f} s")

def main(argv=None) -> int:
    """``python -m rearlib teaching screenshots``: save PNGs of notebook 14's widgets."""
    ap = argparse.ArgumentParser(prog="python -m rearlib teaching", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, help="the teaching tool to run")
    s = sub.add_parser("screenshots", help="serve notebook 14 with Voila and save PNGs of its widgets "
                                           "(needs Debian's chromium and the dev extra: voila, playwright)")
    s.add_argument("--out", default="figures/teaching",
                   help="folder for teaching_surgery.png, teaching_same_ctr.png and teaching_ar_vs_rear.png "
                        "(default: %(default)s)")
    s.add_argument("--timeout", type=float, default=240.0,
                   help="seconds to wait for Voila to answer and for the widgets to render (default: %(default)s)")
    a = ap.parse_args(argv)
    for p in take_screenshots(a.out, timeout_s=a.timeout):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
