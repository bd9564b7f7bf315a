"""The three teaching widgets of notebook 14. Each is a class with ``.widget`` (the ipywidgets box to display) and
pure methods that compute what the widget shows, so tests need no browser:

* :class:`TokenSurgery` - pick an image (dataset index or an uploaded file), see its token grid over the image,
  choose how many tokens are wrong and where (clicked cells, early / late / random), and how they are replaced
  (random code, embedding-nearest, embedding-farthest, or a generator's continuation after the first error);
  ``compute(...) -> SurgeryResult`` (decoded image, CTR, PSNR, SSIM, perceptual distance).
* :class:`SameCTR` - CTR held fixed, vary the embedding distance of the replacement (nearest / random /
  farthest) or the position of the wrong tokens (early / random / late); ``compute(...) -> (table, images)`` and a
  small live plot.
* :class:`ARvsReAR` - the AR and reAR generators sample from the same class and seed (KV cache; the same seed
  gives both models the same random numbers), and the same injected context errors are fed to both:
  ``generate(...)`` and ``context_errors(...)``.

They share a :class:`~rearlib.teaching.lab.Lab`: tokenizer, generators, classifier, image source and caches
(encodings, reconstructions, teacher-forced predictions, samples). Sliders update on release
(``continuous_update=False``). The rules (error positions, replacements, continuation, context errors, image
metrics) are defined in :mod:`rearlib.teaching.surgery`.
"""

from __future__ import annotations

import base64
import time
from typing import Sequence

import ipywidgets as W
import pandas as pd
import torch

from .components import _SLIDER_STYLE, _captioned, _Component, _image_widget, _row, _slider_layout
from .lab import Lab
from .render import (_DISPLAY_PX, _PLACEMENT_LABELS, _REPLACEMENT_LABELS, _SMALL_PX, _LivePlot, _context_table, _fmt,
                     _metric_note, _metrics_table, _model_label, image_png)
from .surgery import (CONTEXT_PLACEMENTS, FACTORS, PLACEMENTS, REPLACEMENTS, SurgeryResult, _check_positions,
                      continue_after_error, error_positions, replace_tokens)


class TokenSurgery(_Component):
    """Widget 1: replace chosen tokens of an image and see what the decoder makes of it
    (:mod:`rearlib.teaching.surgery`).

    Controls: ``image`` (dataset index), ``upload``, ``k`` (how many wrong tokens), ``placement``,
    ``replacement``, ``model`` (for "continue"), ``label`` (class condition for "continue"), ``seed``, the
    clickable token-grid cells (``cells``) and ``clear``. Outputs: ``grid`` (the original image under the token
    grid, wrong cells tinted), ``recon_image``, ``decoded_image``, ``metrics`` (HTML).
    """

    css_class = "rearlib-surgery"

    def __init__(self, lab: Lab, *, image=0, k: int | None = None, placement: str = "random",
                 replacement: str = "nearest", model: str | None = None, seed: int = 0):
        super().__init__(lab)
        N, (h, w) = lab.N, lab.grid
        models = list(lab.generators)
        c = self.controls
        c["image"] = W.IntSlider(value=int(image) if not isinstance(image, str) else 0, min=0,
                                 max=lab.n_images - 1, description="dataset image #", continuous_update=False,
                                 style=_SLIDER_STYLE, layout=_slider_layout())
        c["upload"] = W.FileUpload(accept="image/*", multiple=False, description="upload image")
        c["k"] = W.IntSlider(value=N // 8 if k is None else int(k), min=0, max=N, description="wrong tokens k",
                             continuous_update=False, style=_SLIDER_STYLE, layout=_slider_layout())
        c["placement"] = W.Dropdown(options=[(_PLACEMENT_LABELS[p], p) for p in PLACEMENTS], value=placement,
                                    description="where", style=_SLIDER_STYLE)
        c["replacement"] = W.Dropdown(options=[(_REPLACEMENT_LABELS[r], r) for r in REPLACEMENTS],
                                      value=replacement, description="replaced by", style=_SLIDER_STYLE)
        c["model"] = W.Dropdown(options=[(_model_label(m), m) for m in models], value=model or models[0],
                                description="generator", style=_SLIDER_STYLE)
        c["label"] = W.Dropdown(options=[(n, i) for i, n in enumerate(lab.class_names)], value=0,
                                description="class condition", style=_SLIDER_STYLE)
        c["seed"] = W.BoundedIntText(value=int(seed), min=0, max=2 ** 31 - 1, description="seed",
                                     layout=W.Layout(width="160px"))
        c["clear"] = W.Button(description="clear clicked cells", layout=W.Layout(width="160px"))
        for name in ("k", "placement", "replacement", "model", "label", "seed"):
            self._watch(name, self.refresh, name)
        self._watch("image", self._on_image, "image")
        self._watch("upload", self._on_upload, "upload")
        c["clear"].on_click(lambda _b: self._run(self._on_clear, "clear"))
        for name, ctl in c.items():
            ctl.add_class(f"{self.css_class}-{name}")

        # The token grid: one transparent toggle per token over the original image (a CSS background), so a click
        # on the picture selects that token. Works in JupyterLab and Voila (plain ipywidgets + a <style>).
        cell = _DISPLAY_PX // max(h, w)
        self._grid_css = f"rearlib-grid-{id(self):x}"
        self.cells = [W.ToggleButton(value=False, description="", tooltip=f"token {i} (row {i // w}, col {i % w})",
                                     layout=W.Layout(width=f"{cell}px", height=f"{cell}px", padding="0px",
                                                     margin="0px"))
                      for i in range(N)]
        for i, b in enumerate(self.cells):
            b.add_class("rearlib-cell")
            b.observe(lambda change, i=i: self._run(lambda: self._on_cell(i), "click"), names="value")
        self.grid = W.GridBox(self.cells, layout=W.Layout(
            grid_template_columns=f"repeat({w}, {cell}px)", grid_template_rows=f"repeat({h}, {cell}px)",
            grid_gap="0px", width=f"{cell * w}px", height=f"{cell * h}px"))
        self.grid.add_class(self._grid_css)
        self.grid.add_class(f"{self.css_class}-grid")
        self._grid_style = W.HTML(value="")
        self.recon_image = _image_widget(_DISPLAY_PX, f"{self.css_class}-recon")
        self.decoded_image = _image_widget(_DISPLAY_PX, f"{self.css_class}-decoded")
        self.metrics = W.HTML(value="")
        self.metrics.add_class(f"{self.css_class}-metrics")
        self.source = W.HTML(value="")
        grid_box, _ = _captioned(self.grid, "<b>original</b> - click tokens to make them wrong")
        recon_box, _ = _captioned(self.recon_image, "<b>all tokens right</b> (tokenizer reconstruction)")
        dec_box, self._dec_caption = _captioned(self.decoded_image, "<b>with wrong tokens</b>")
        row1 = _row([c["image"], c["upload"], self.source])
        row2 = _row([c["k"], c["placement"], c["replacement"]])
        row3 = _row([c["model"], c["label"], c["seed"], c["clear"]])
        self.widget = W.VBox([self._grid_style, W.HTML("<h4>Token surgery</h4>"), row1, row2, row3,
                              _row([grid_box, recon_box, dec_box]), self.metrics, self.status])
        self.widget.add_class(self.css_class)
        self._image_key = image if isinstance(image, str) else int(image)
        self.result: SurgeryResult | None = None
        self._sync_label()
        self._run(self.refresh, "initial")

    # ---- pure -------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        c = self.controls
        return dict(image=self._image_key, k=c["k"].value, placement=c["placement"].value,
                    replacement=c["replacement"].value, model=c["model"].value, label=c["label"].value,
                    seed=c["seed"].value, clicked=tuple(i for i, b in enumerate(self.cells) if b.value))

    def compute(self, image=0, k: int = 32, placement: str = "random", replacement: str = "nearest",
                model: str | None = None, label: int | None = None, seed: int = 0, clicked=()) -> SurgeryResult:
        """The surgery for one state (no widgets involved). ``label`` (class condition of "continue") defaults to
        the image's label; ``model`` to the lab's first generator."""
        lab = self.lab
        t0 = time.perf_counter()
        if replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
        original, img_label, _ = lab.image(image)
        label = img_label if label is None else int(label)
        gt = lab.tokens(image)
        pos = error_positions(lab.N, int(k), placement, seed=int(seed), clicked=clicked)
        first = int(pos[0]) if pos.numel() else None
        name = None
        if replacement == "continue":
            name = model or next(iter(lab.generators))
            with lab.compute():
                tokens, first = continue_after_error(lab.model(name), gt, pos, label, seed=int(seed))
        else:
            tokens = replace_tokens(gt, pos, replacement, codebook_size=lab.K, neighbours=lab.neighbours,
                                    seed=int(seed))
        ctr = float((tokens == gt).double().mean())
        if replacement != "continue" and abs(ctr - (1 - pos.numel() / lab.N)) > 1e-12:
            raise RuntimeError(f"CTR {ctr} != 1 - k/N with k = {pos.numel()}")
        recon = lab.reconstruction(image)
        if bool((tokens == gt).all()):
            decoded = recon
        else:
            decoded = lab.decode(tokens[None])[0]
        m = lab.score(torch.stack([decoded, recon]), original)
        return SurgeryResult(image=image, label=label, placement=placement, replacement=replacement, model=name,
                             seed=int(seed), gt=gt, tokens=tokens, positions=pos, first_error=first,
                             original=original, reconstruction=recon, decoded=decoded, ctr=ctr,
                             psnr=m["psnr"][0], ssim=m["ssim"][0], perceptual=m["perceptual"][0],
                             recon_psnr=m["psnr"][1], recon_ssim=m["ssim"][1], recon_perceptual=m["perceptual"][1],
                             perceptual_metric=m["perceptual_metric"], seconds=time.perf_counter() - t0)

    # ---- callbacks --------------------------------------------------------------------------------------------
    def refresh(self) -> SurgeryResult:
        st = self.state()
        c = self.controls
        c["k"].disabled = st["placement"] == "clicked"
        cont = st["replacement"] == "continue"
        c["model"].disabled = c["label"].disabled = not cont
        r = self.result = self.compute(**st)
        lab = self.lab
        h, w = lab.grid
        mark = torch.zeros(lab.N, dtype=torch.bool)
        if cont and r.first_error is not None:
            mark[r.first_error:] = True  # everything from the first error on is written by the model
        else:
            mark[r.positions] = True
        self._set_grid_background(r.original, mark.reshape(h, w))
        self.recon_image.value = image_png(r.reconstruction)
        self.decoded_image.value = image_png(r.decoded)
        what = (f"{_model_label(r.model)} continues from token {r.first_error}" if cont and r.first_error is not None
                else f"{r.k} wrong token{'' if r.k == 1 else 's'} "
                     f"({_REPLACEMENT_LABELS.get(r.replacement, r.replacement)})")
        self._dec_caption.value = f"<b>with wrong tokens</b>: {what}"
        self.metrics.value = _metrics_table(r)
        return r

    def _set_grid_background(self, image: torch.Tensor, mark: torch.Tensor) -> None:
        b64 = base64.b64encode(image_png(image, mark=mark, alpha=0.45)).decode()
        css = self._grid_css
        self._grid_style.value = (
            "<style>"
            f".{css} {{background-image: url(data:image/png;base64,{b64}); background-size: 100% 100%;"
            f" image-rendering: pixelated; cursor: crosshair;}}"
            f".{css} .rearlib-cell {{background: transparent !important; box-shadow: none !important;"
            f" border: 1px solid rgba(255,255,255,0.28) !important; border-radius: 0 !important; min-width: 0;"
            f" padding: 0 !important; margin: 0 !important;}}"
            f".{css} .rearlib-cell:hover {{border: 1px solid #ffeb3b !important;}}"
            f".{css} .rearlib-cell.mod-active {{border: 2px solid #ffeb3b !important;}}"
            "</style>")

    def _sync_label(self) -> None:
        with self._programmatic():
            self.controls["label"].value = self.lab.image(self._image_key)[1]
        self.source.value = f"<small>{self.lab.image(self._image_key)[2]}</small>"

    def _on_image(self) -> None:
        self._image_key = int(self.controls["image"].value)
        self._sync_label()
        self.refresh()

    def _on_upload(self) -> None:
        files = self.controls["upload"].value
        if not files:
            return
        f = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
        self._image_key = self.lab.add_upload(f["content"], f.get("name", "upload"))
        self._sync_label()
        self.refresh()

    def _on_cell(self, i: int) -> None:
        if self.controls["placement"].value != "clicked":
            with self._programmatic():
                self.controls["placement"].value = "clicked"
        self.refresh()

    def _on_clear(self) -> None:
        with self._programmatic():
            for b in self.cells:
                b.value = False
        self.refresh()

    def set_clicked(self, positions) -> None:
        """Click cells programmatically (then one refresh): placement becomes "clicked"."""
        pos = set(_check_positions(sorted(set(int(p) for p in positions)), self.lab.N).tolist())
        with self._programmatic():
            for i, b in enumerate(self.cells):
                b.value = i in pos
            self.controls["placement"].value = "clicked"
        self._run(self.refresh, "click")


class SameCTR(_Component):
    """Widget 2: CTR held fixed, one factor varied (:mod:`rearlib.teaching.surgery`, :data:`FACTORS`).

    ``k = round((1 - ctr) N)`` wrong tokens. "embedding distance": the same random positions, replaced by the
    nearest / a random / the farthest code. "error position": the same replacement rule (``replacement``) at the
    first k, k random, or the last k positions. Controls: ``image``, ``ctr``, ``factor``, ``replacement``,
    ``seed``. Outputs: one image per level, ``plot`` (perceptual distance and PSNR against the level), ``table``.
    """

    css_class = "rearlib-samectr"

    def __init__(self, lab: Lab, *, image: int = 0, ctr: float = 0.9, factor: str = "embedding distance",
                 replacement: str = "random", seed: int = 0):
        super().__init__(lab)
        c = self.controls
        c["image"] = W.IntSlider(value=int(image), min=0, max=lab.n_images - 1, description="dataset image #",
                                 continuous_update=False, style=_SLIDER_STYLE, layout=_slider_layout())
        c["ctr"] = W.FloatSlider(value=float(ctr), min=0.5, max=1.0, step=0.01, description="CTR (held fixed)",
                                 continuous_update=False, readout_format=".2f", style=_SLIDER_STYLE,
                                 layout=_slider_layout())
        c["factor"] = W.ToggleButtons(options=list(FACTORS), value=factor, tooltips=[
            "same positions, nearest / random / farthest code", "same rule, first / random / last k tokens"],
            style={"button_width": "180px"})
        c["replacement"] = W.Dropdown(options=[(_REPLACEMENT_LABELS[r], r) for r in FACTORS["embedding distance"]],
                                      value=replacement, description="replaced by", style=_SLIDER_STYLE)
        c["seed"] = W.BoundedIntText(value=int(seed), min=0, max=2 ** 31 - 1, description="seed",
                                     layout=W.Layout(width="160px"))
        for name in c:
            self._watch(name, self.refresh, name)
            c[name].add_class(f"{self.css_class}-{name}")
        n_levels = max(len(v) for v in FACTORS.values())
        self.original_image = _image_widget(_SMALL_PX, f"{self.css_class}-original")
        self.level_images, self._captions, boxes = [], [], []
        orig_box, _ = _captioned(self.original_image, "<b>original</b>")
        for i in range(n_levels):
            im = _image_widget(_SMALL_PX, f"{self.css_class}-level{i}")
            box, cap = _captioned(im, "")
            self.level_images.append(im)
            self._captions.append(cap)
            boxes.append(box)
        self.plot = W.Image(format="png")
        self._plot = _LivePlot()
        self.plot.add_class(f"{self.css_class}-plot")
        self.table = W.HTML(value="")
        self.table.add_class(f"{self.css_class}-table")
        self.widget = W.VBox([W.HTML("<h4>Same CTR, different quality</h4>"),
                              _row([c["image"], c["ctr"], c["seed"]]),
                              _row([W.HTML("vary:&nbsp;"), c["factor"], c["replacement"]]),
                              _row([orig_box] + boxes), _row([self.plot, self.table]), self.status])
        self.widget.add_class(self.css_class)
        self.frame: pd.DataFrame | None = None
        self._run(self.refresh, "initial")

    def state(self) -> dict:
        c = self.controls
        return dict(image=int(c["image"].value), ctr=float(c["ctr"].value), factor=c["factor"].value,
                    replacement=c["replacement"].value, seed=int(c["seed"].value))

    def compute(self, image=0, ctr: float = 0.9, factor: str = "embedding distance", replacement: str = "random",
                seed: int = 0) -> tuple[pd.DataFrame, torch.Tensor]:
        """(one row per level: level, k, ctr, psnr, ssim, perceptual, perceptual_metric; decoded images
        [levels, 3, R, R]) for one state (no widgets involved)."""
        lab = self.lab
        if factor not in FACTORS:
            raise ValueError(f"factor must be one of {list(FACTORS)}, got {factor!r}")
        if not 0.0 <= float(ctr) <= 1.0:
            raise ValueError(f"ctr must be in [0, 1], got {ctr!r}")
        k = int(round((1.0 - float(ctr)) * lab.N))
        original, label, _ = lab.image(image)
        gt = lab.tokens(image)
        rows, seqs = [], []
        for level in FACTORS[factor]:
            if factor == "embedding distance":
                pos, mode = error_positions(lab.N, k, "random", seed=seed), level
            else:
                pos, mode = error_positions(lab.N, k, level, seed=seed), replacement
            seqs.append(replace_tokens(gt, pos, mode, codebook_size=lab.K, neighbours=lab.neighbours, seed=seed))
            rows.append({"image": image, "label": label, "factor": factor, "level": level, "replacement": mode,
                         "k": k, "n_tokens": lab.N, "seed": seed})
        seqs = torch.stack(seqs)
        decoded = lab.decode(seqs)
        m = lab.score(decoded, original)
        ctrs = (seqs == gt[None]).double().mean(1).tolist()
        for i, row in enumerate(rows):
            row.update(ctr=ctrs[i], psnr=m["psnr"][i], ssim=m["ssim"][i], perceptual=m["perceptual"][i],
                       perceptual_metric=m["perceptual_metric"])
        return pd.DataFrame(rows), decoded

    def refresh(self) -> pd.DataFrame:
        st = self.state()
        self.controls["replacement"].disabled = st["factor"] != "error position"
        df, decoded = self.compute(**st)
        self.frame = df
        original = self.lab.image(st["image"])[0]
        self.original_image.value = image_png(original, _SMALL_PX)
        for i, (im, cap) in enumerate(zip(self.level_images, self._captions)):
            if i < len(df):
                r = df.iloc[i]
                im.value = image_png(decoded[i], _SMALL_PX)
                im.layout.display = None
                cap.value = (f"<b>{r.level}</b><br><small>CTR {r.ctr:.1%} · PSNR {_fmt(r.psnr, 1)} dB<br>"
                             f"{r.perceptual_metric.split('[')[0]} {_fmt(r.perceptual, 3)}</small>")
            else:
                im.layout.display = "none"
                cap.value = ""
        self.plot.value = self._plot.png(df)
        name = df["perceptual_metric"].iloc[0]
        note = _metric_note(name)
        note = f" {note}" if note else ""
        self.table.value = (f"<small>k = {int(df.k.iloc[0])} of {self.lab.N} tokens wrong in every image: the same "
                            f"CTR of {df.ctr.iloc[0]:.1%}.<br>Perceptual distance: {name}{note}.</small>")
        return df


class ARvsReAR(_Component):
    """Widget 3: two generators side by side - samples from the same class and seed, and the same context errors.

    Controls: ``label``, ``seed``, ``cfg`` (the sampling part) and ``image``, ``k``, ``placement``,
    ``error_seed`` (the context-error part). Outputs: ``sample_images`` {model: Image}, ``context_image`` (the
    original with the corrupted tokens tinted), ``pred_images`` {(model, "clean" | "corrupted"): Image},
    ``context_table`` (HTML).
    """

    css_class = "rearlib-arvsrear"

    def __init__(self, lab: Lab, *, models: Sequence[str] = ("ar", "rear"), label: int = 0, seed: int = 0,
                 cfg: float = 1.0, image: int = 0, k: int | None = None, placement: str = "random",
                 error_seed: int = 0, live_every: int = 32):
        super().__init__(lab)
        self.live_every = int(live_every)  # sampled tokens between two updates of the growing samples
        if not models:
            raise ValueError("models must name at least one generator")
        for m in models:
            lab.model(m)  # raises ValueError for an unknown name
        self.models = list(models)
        c = self.controls
        c["label"] = W.Dropdown(options=[(n, i) for i, n in enumerate(lab.class_names)], value=int(label),
                                description="class", style=_SLIDER_STYLE)
        c["seed"] = W.BoundedIntText(value=int(seed), min=0, max=2 ** 31 - 1, description="seed",
                                     layout=W.Layout(width="160px"))
        c["cfg"] = W.FloatSlider(value=float(cfg), min=1.0, max=4.0, step=0.5, description="guidance (1 = off)",
                                 continuous_update=False, style=_SLIDER_STYLE, layout=_slider_layout())
        c["image"] = W.IntSlider(value=int(image), min=0, max=lab.n_images - 1, description="dataset image #",
                                 continuous_update=False, style=_SLIDER_STYLE, layout=_slider_layout())
        c["k"] = W.IntSlider(value=(lab.N - 1) // 10 if k is None else int(k), min=0, max=lab.N - 1,
                             description="corrupted context tokens k", continuous_update=False,
                             style=_SLIDER_STYLE, layout=_slider_layout())
        c["placement"] = W.Dropdown(options=[(_PLACEMENT_LABELS[p], p) for p in CONTEXT_PLACEMENTS],
                                    value=placement, description="where", style=_SLIDER_STYLE)
        c["error_seed"] = W.BoundedIntText(value=int(error_seed), min=0, max=2 ** 31 - 1, description="seed",
                                           layout=W.Layout(width="160px"))
        for name in ("label", "seed", "cfg"):
            self._watch(name, self.refresh_samples, name)
        for name in ("image", "k", "placement", "error_seed"):
            self._watch(name, self.refresh_context, "context " + name)
        for name, ctl in c.items():
            ctl.add_class(f"{self.css_class}-{name}")
        self.sample_images, sample_boxes, self._sample_caps = {}, [], {}
        for m in self.models:
            self.sample_images[m] = _image_widget(_SMALL_PX, f"{self.css_class}-sample-{m}")
            box, self._sample_caps[m] = _captioned(self.sample_images[m], f"<b>{_model_label(m)}</b>")
            sample_boxes.append(box)
        self.context_image = _image_widget(_SMALL_PX, f"{self.css_class}-context")
        ctx_box, self._ctx_cap = _captioned(self.context_image, "<b>context</b>")
        self.pred_images, pred_boxes = {}, []
        for m in self.models:
            for cond in ("clean", "corrupted"):
                self.pred_images[(m, cond)] = _image_widget(_SMALL_PX, f"{self.css_class}-pred-{m}-{cond}")
                box, _ = _captioned(self.pred_images[(m, cond)],
                                    f"<b>{_model_label(m)}</b>, {cond} context<br><small>decoded predictions</small>")
                pred_boxes.append(box)
        self.context_table = W.HTML(value="")
        self.context_table.add_class(f"{self.css_class}-table")
        self.sample_status = W.HTML(value="")
        self.widget = W.VBox([
            W.HTML("<h4>AR vs reAR: same class, same seed</h4>"),
            _row([c["label"], c["seed"], c["cfg"]]), _row(sample_boxes), self.sample_status,
            W.HTML("<h4>AR vs reAR: the same errors in the context</h4>"),
            _row([c["image"], c["k"], c["placement"], c["error_seed"]]),
            _row([ctx_box] + pred_boxes), self.context_table, self.status])
        self.widget.add_class(self.css_class)
        self.samples: dict | None = None
        self.context: pd.DataFrame | None = None
        self._run(self.refresh_context, "initial context")
        self._run(self.refresh_samples, "initial samples")

    # ---- pure -------------------------------------------------------------------------------------------------
    def generate(self, label: int = 0, seed: int = 0, cfg: float = 1.0) -> dict:
        """``{model: {"tokens": [N], "image": [3, R, R], "class": classifier argmax or None, "prob": float}}``."""
        lab = self.lab
        out = {}
        toks = [lab.generate(m, int(label), int(seed), cfg) for m in self.models]
        images = lab.decode(torch.stack(toks))
        preds, probs = lab.classify(images) if lab.classifier is not None else ([None] * len(toks),
                                                                               [float("nan")] * len(toks))
        for m, t, im, p, q in zip(self.models, toks, images, preds, probs):
            out[m] = {"tokens": t, "image": im, "class": p, "prob": q}
        return out

    def context_errors(self, image=0, k: int = 25, placement: str = "random", error_seed: int = 0
                       ) -> tuple[pd.DataFrame, dict]:
        """Teacher-forced predictions of each model with the clean and the corrupted context
        (:mod:`rearlib.teaching.surgery`, "Context errors").

        Returns (one row per (model, condition): ctr, ctr_after_error, n_corrupted, psnr, ssim, perceptual,
        perceptual_metric; ``{"positions", "context": corrupted tokens, "images": {(model, condition): image}}``).
        """
        lab = self.lab
        if placement not in CONTEXT_PLACEMENTS:
            raise ValueError(f"placement must be one of {CONTEXT_PLACEMENTS}, got {placement!r}")
        original, label, _ = lab.image(image)
        gt = lab.tokens(image)
        pos = error_positions(lab.N - 1, int(k), placement, seed=int(error_seed))   # x_1..x_{N-1} only
        noisy = replace_tokens(gt, pos, "random", codebook_size=lab.K, seed=int(error_seed))
        after = torch.zeros(lab.N, dtype=torch.bool)
        after[pos + 1] = True        # target x_{t+1} follows the corrupted input x_t
        rows, preds, keys = [], [], []
        for m in self.models:
            for cond, ctx in (("clean", gt), ("corrupted", noisy)):
                p = lab.teacher_forced(m, ctx, label)
                correct = p == gt
                rows.append({"image": image, "label": label, "model": m, "condition": cond,
                             "placement": placement, "k": int(pos.numel()), "n_tokens": lab.N,
                             "error_seed": int(error_seed), "ctr": float(correct.double().mean()),
                             "ctr_after_error": float(correct[after].double().mean()) if pos.numel() else float("nan")})
                preds.append(p)
                keys.append((m, cond))
        decoded = lab.decode(torch.stack(preds))
        sc = lab.score(decoded, original)
        for i, row in enumerate(rows):
            row.update(psnr=sc["psnr"][i], ssim=sc["ssim"][i], perceptual=sc["perceptual"][i],
                       perceptual_metric=sc["perceptual_metric"])
        return pd.DataFrame(rows), {"positions": pos, "context": noisy,
                                    "images": {key: decoded[i] for i, key in enumerate(keys)}}

    # ---- callbacks --------------------------------------------------------------------------------------------
    def refresh_samples(self) -> dict:
        c = self.controls
        label, seed, cfg = int(c["label"].value), int(c["seed"].value), float(c["cfg"].value)
        cached = all(("gen", m, label, seed, None if cfg == 1.0 else cfg) in self.lab._cache for m in self.models)
        t0 = time.perf_counter()
        if not cached:
            # Show the raster scan as it happens (the first rows appear within a fraction of a second on a CPU);
            # the finished samples land in the lab's cache, so generate() below only decodes and classifies.
            for state in self.lab.generate_live(self.models, label, seed, cfg, every=self.live_every):
                done = min(d for d, _ in state.values())
                for m, (d, toks) in state.items():
                    self.sample_images[m].value = image_png(self.lab.partial_image(d, toks), _SMALL_PX)
                self.sample_status.value = (f"<small>sampling: {done} of {self.lab.N} tokens with each model, "
                                            f"{time.perf_counter() - t0:.1f} s (cached afterwards)…</small>")
        s = self.samples = self.generate(label, seed, cfg)
        for m in self.models:
            self.sample_images[m].value = image_png(s[m]["image"], _SMALL_PX)
            cls = s[m]["class"]
            guess = "" if cls is None else (f"<br><small>classifier: {self.lab.class_names[cls]} "
                                            f"({s[m]['prob']:.0%})</small>")
            self._sample_caps[m].value = f"<b>{_model_label(m)}</b>{guess}"
        self.sample_status.value = (f"<small>class {self.lab.class_names[label]}, seed {seed}, guidance {cfg:g}: "
                                    f"{'cached' if cached else 'sampled'} in {time.perf_counter() - t0:.2f} s. "
                                    f"Same seed = same random numbers for both models.</small>")
        return s

    def refresh_context(self) -> pd.DataFrame:
        c = self.controls
        df, out = self.context_errors(int(c["image"].value), int(c["k"].value), c["placement"].value,
                                      int(c["error_seed"].value))
        self.context = df
        lab = self.lab
        mark = torch.zeros(lab.N, dtype=torch.bool)
        mark[out["positions"]] = True
        self.context_image.value = image_png(lab.image(int(c["image"].value))[0], _SMALL_PX,
                                             mark=mark.reshape(lab.grid))
        self._ctx_cap.value = f"<b>context</b>: {int(mark.sum())} corrupted tokens (tinted)"
        for key, im in self.pred_images.items():
            im.value = image_png(out["images"][key], _SMALL_PX)
        self.context_table.value = _context_table(df)
        return df
