"""The base of every teaching widget (controls, status line, callbacks that show their errors, timings), the
ipywidgets layout helpers they share, and the kernel-side latency of interactions (:func:`measure_latency`)."""

from __future__ import annotations

import contextlib
import html
import time
from typing import Callable, Sequence

import ipywidgets as W
import numpy as np
import pandas as pd

from .lab import Lab


class _Component:
    """``widget`` (a VBox), ``controls`` ({name: ipywidget}), ``timings`` ([(interaction, seconds)]),
    ``last_error`` (the last callback exception, shown in the status line too)."""

    css_class = "rearlib-widget"

    def __init__(self, lab: Lab):
        self.lab = lab
        self.controls: dict = {}
        self.timings: list[tuple[str, float]] = []
        self.last_error: BaseException | None = None
        self._quiet = 0  # > 0 while controls are changed programmatically (no callbacks)
        self.status = W.HTML(value="")
        self.status.add_class(f"{self.css_class}-status")

    def _watch(self, name: str, handler: Callable[[], None], what: str) -> None:
        self.controls[name].observe(lambda change: self._run(handler, what), names="value")

    def _run(self, handler: Callable[[], None], what: str) -> None:
        if self._quiet:
            return
        t0 = time.perf_counter()
        try:
            handler()
            self.last_error = None
        except Exception as err:  # a teaching UI shows the error instead of dying silently in the kernel log
            self.last_error = err
            self.status.value = f"<span style='color:#b00'>error: {type(err).__name__}: {html.escape(str(err))}</span>"
            return
        dt = time.perf_counter() - t0
        self.timings.append((what, dt))
        self.status.value = f"<small>updated in {dt * 1e3:.0f} ms ({what})</small>"

    @contextlib.contextmanager
    def _programmatic(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1


def _image_widget(px: int, css: str):
    w = W.Image(format="png", layout=W.Layout(width=f"{px}px", height=f"{px}px"))
    w.add_class(css)
    return w


def _captioned(widget, caption_html: str, css: str | None = None):
    cap = W.HTML(value=caption_html)
    if css:
        cap.add_class(css)
    return W.VBox([cap, widget], layout=W.Layout(align_items="center", margin="0 6px")), cap


_SLIDER_STYLE = {"description_width": "initial"}


def _row(children):
    """An HBox that wraps onto the next line in a narrow notebook column instead of overflowing."""
    return W.HBox(children, layout=W.Layout(flex_flow="row wrap", align_items="flex-start"))


def _slider_layout():
    return W.Layout(width="380px")


def measure_latency(component: _Component, changes: Sequence[tuple[str, object]], *,
                    interaction: str | None = None) -> pd.DataFrame:
    """Apply control changes one by one (``(control name, new value)``) and time each: the kernel-side wall time
    from setting the value until every callback returned (browser rendering not included). A change to the
    current value would run no callback, so it raises ValueError. Returns one row per change."""
    rows = []
    for name, value in changes:
        ctl = component.controls[name]
        if ctl.value == value:
            raise ValueError(f"{name} is already {value!r}: the change would not run any callback")
        n_before = len(component.timings)
        t0 = time.perf_counter()
        ctl.value = value
        dt = time.perf_counter() - t0
        if component.last_error is not None:
            raise RuntimeError(f"the callback of {name} = {value!r} failed") from component.last_error
        if len(component.timings) == n_before:
            raise RuntimeError(f"changing {name} ran no callback")
        rows.append({"component": type(component).__name__, "interaction": interaction or name, "control": name,
                     "value": str(value), "seconds": dt})
    return pd.DataFrame(rows)


def latency_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (component, interaction): n, median, max and p90 (s) of :func:`measure_latency` rows."""
    g = df.groupby(["component", "interaction"], sort=False)["seconds"]
    out = g.agg(n="count", median="median", p90=lambda s: float(np.quantile(s, 0.9)), max="max").reset_index()
    return out
