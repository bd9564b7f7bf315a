"""What the teaching widgets show, drawn without ipywidgets: PNG images, number formats, labels, HTML tables and
the live plot of :class:`~rearlib.teaching.widgets.SameCTR`."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .surgery import SurgeryResult

_PLACEMENT_LABELS = {"clicked": "clicked cells", "early": "early (first k)", "late": "late (last k)",
                     "random": "random"}
_REPLACEMENT_LABELS = {"nearest": "embedding-nearest code", "random": "random code",
                       "farthest": "embedding-farthest code", "continue": "model continues after the 1st error"}
_DISPLAY_PX = 256          # the token-grid overlay and the main images are shown at this size
_SMALL_PX = 160            # side-by-side images


def image_png(image: torch.Tensor, size: int = _DISPLAY_PX, *, mark=None, mark_color=(255, 40, 40),
              alpha: float = 0.5) -> bytes:
    """PNG bytes of a float image [3, H, W] in [0, 1], upscaled to ``size`` px with nearest-neighbour (pixels stay
    visible). ``mark``: bool [h, w] token cells, tinted with ``mark_color`` at opacity ``alpha``."""
    if not torch.is_tensor(image) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a float tensor [3, H, W]; got {getattr(image, 'shape', type(image))}")
    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = np.asarray(Image.fromarray(arr).resize((size, size), Image.NEAREST)).astype(np.float32)
    if mark is not None:
        m = torch.as_tensor(mark, dtype=torch.bool).cpu().numpy()
        if m.ndim != 2:
            raise ValueError(f"mark must be a bool grid [h, w]; got shape {m.shape}")
        h, w = m.shape
        m = m[(np.arange(size) * h // size)[:, None], (np.arange(size) * w // size)[None, :]]
        im[m] = (1 - alpha) * im[m] + alpha * np.asarray(mark_color, np.float32)
    buf = io.BytesIO()
    Image.fromarray(im.round().clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _fmt(v: float, digits: int = 3, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞" + unit
    return f"{v:.{digits}f}{unit}"


def _model_label(name: str | None) -> str:
    return {"ar": "AR", "rear": "reAR"}.get(name, str(name))


def _metric_note(name: str) -> str:
    """What a reader should know about the perceptual metric shown (empty for LPIPS itself)."""
    if name.startswith("ST-LPIPS"):
        return "(ST-LPIPS: shift-tolerant LPIPS, a learned perceptual metric of the LPIPS family; not LPIPS itself)"
    if name.startswith("DFD"):
        return "(a feature distance in the in-project classifier, <b>not</b> LPIPS)"
    return ""


def _metrics_table(r: SurgeryResult) -> str:
    sub = _metric_note(r.perceptual_metric)
    sub = f" <small>{sub}</small>" if sub else ""
    rows = [("CTR (correct-token ratio)", "100%", f"{r.ctr:.1%}"),
            ("PSNR vs original (dB, higher is better)", _fmt(r.recon_psnr, 2), _fmt(r.psnr, 2)),
            ("SSIM vs original (higher is better)", _fmt(r.recon_ssim, 3), _fmt(r.ssim, 3)),
            (f"{r.perceptual_metric} vs original (lower is better){sub}", _fmt(r.recon_perceptual, 3),
             _fmt(r.perceptual, 3))]
    body = "".join(f"<tr><td style='text-align:left'>{a}</td><td>{b}</td><td><b>{c}</b></td></tr>"
                   for a, b, c in rows)
    return ("<table style='border-collapse:collapse' cellpadding='3'>"
            "<tr><th></th><th>all tokens right</th><th>with wrong tokens</th></tr>" + body + "</table>")


def _context_table(df: pd.DataFrame) -> str:
    name = df["perceptual_metric"].iloc[0]
    head = ("<tr><th>model</th><th>context</th><th>teacher-forced CTR</th><th>CTR right after an error</th>"
            f"<th>PSNR (dB)</th><th>{name}</th></tr>")
    body = "".join(
        f"<tr><td>{_model_label(r.model)}</td><td>{r.condition}</td><td>{r.ctr:.1%}</td>"
        f"<td>{'–' if math.isnan(r.ctr_after_error) else f'{r.ctr_after_error:.1%}'}</td>"
        f"<td>{_fmt(r.psnr, 2)}</td><td>{_fmt(r.perceptual, 3)}</td></tr>" for r in df.itertuples())
    note = _metric_note(name)
    note = f" {note}" if note else ""
    return (f"<table cellpadding='3'>{head}{body}</table><small>Each model predicts every token from the "
            f"(clean or corrupted) tokens before it; images decode those predictions. 'Right after an error': the "
            f"tokens that directly follow a corrupted one (clean rows: the same tokens, clean context). "
            f"{name}{note}.</small>")


class _LivePlot:
    """The small plot of :class:`SameCTR`: perceptual distance and PSNR against the level. The figure (Agg, no
    pyplot) is built once and only its data change, which keeps a redraw near 50 ms instead of ~250 ms."""

    def __init__(self):
        # Fixed margins: constrained/tight layout would re-measure every text on every redraw.
        self.fig = Figure(figsize=(5.4, 2.1), dpi=80)
        self.fig.subplots_adjust(left=0.11, right=0.98, bottom=0.16, top=0.86, wspace=0.38)
        FigureCanvasAgg(self.fig)
        self.ax1, self.ax2 = self.fig.subplots(1, 2)
        (self.l1,) = self.ax1.plot([], [], "o-", color="C3")
        (self.l2,) = self.ax2.plot([], [], "o-", color="C0")
        self.ax2.set_ylabel("PSNR (dB) ↑", fontsize=8)
        for ax in (self.ax1, self.ax2):
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)

    def png(self, df: pd.DataFrame) -> bytes:
        x = np.arange(len(df))
        self.l1.set_data(x, df["perceptual"].to_numpy(float))
        self.l2.set_data(x, df["psnr"].replace([np.inf], np.nan).to_numpy(float))
        self.ax1.set_ylabel(df["perceptual_metric"].iloc[0].split("[")[0] + " ↓", fontsize=8)
        for ax in (self.ax1, self.ax2):
            ax.set_xticks(x, df["level"], fontsize=8)
            ax.set_xlim(-0.3, len(df) - 0.7)
            ax.relim()
            ax.autoscale_view(scalex=False)
        self.fig.suptitle(f"{df['factor'].iloc[0]} at CTR {df['ctr'].iloc[0]:.1%}", fontsize=9)
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png")
        return buf.getvalue()
