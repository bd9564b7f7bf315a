"""Teaching widgets (notebook 14): the paper's diagnosis, live, on a laptop CPU.

The paper's point (paper §3.1; docs/paper.md, reAR §2.1-§2.2): a visual AR model is trained and judged on token
*indices*, but the tokenizer decodes code *vectors*. Two sequences with the same correct-token ratio (CTR) can
decode to very different images, and an error early in the context changes everything the model writes after it.
Notebook 14 shows this with three ipywidgets (in JupyterLab, or as an app with Voila) and the shipped small models.

Modules, in the order they build on each other:

* :mod:`~.surgery` - the rules, as pure functions: which tokens are wrong (:func:`error_positions`), what
  replaces them (:func:`replace_tokens`, :func:`random_codes`, :func:`continue_after_error`), and
  :class:`SurgeryResult`; its docstring defines every rule and metric the widgets show.
* :mod:`~.lab` - :class:`Lab`, what the widgets share: tokenizer, generators, classifier, image source and caches.
* :mod:`~.render` - what the widgets draw: :func:`image_png`, labels, HTML tables and the live plot.
* :mod:`~.components` - the widgets' base class and layout helpers, and the kernel-side latency of interactions
  (:func:`measure_latency`, :func:`latency_summary`).
* :mod:`~.widgets` - the three widgets: :class:`TokenSurgery`, :class:`SameCTR` and :class:`ARvsReAR`.
* :mod:`~.screenshots` - Voila and headless Chromium (:func:`serve_voila`, :func:`chromium_page`,
  :func:`take_screenshots`) and the command line ``python -m rearlib teaching screenshots`` (:func:`main`).
"""

from __future__ import annotations

from .components import latency_summary, measure_latency
from .lab import Lab
from .render import _model_label, image_png  # noqa: F401  (_model_label: notebook 14 labels its figure with it)
from .screenshots import (CHROMIUM_ARGS, chromium_page, find_chromium, image_digest, main, serve_voila,
                          take_screenshots, wait_for_widgets)
from .surgery import (CONTEXT_PLACEMENTS, FACTORS, PLACEMENTS, REPLACEMENTS, SurgeryResult, continue_after_error,
                      error_positions, random_codes, replace_tokens)
from .widgets import ARvsReAR, SameCTR, TokenSurgery

__all__ = [
    "PLACEMENTS", "REPLACEMENTS", "CONTEXT_PLACEMENTS", "FACTORS",
    "error_positions", "random_codes", "replace_tokens", "continue_after_error", "image_png",
    "Lab", "SurgeryResult", "TokenSurgery", "SameCTR", "ARvsReAR", "measure_latency", "latency_summary",
    "CHROMIUM_ARGS", "find_chromium", "chromium_page", "serve_voila", "take_screenshots",
    "wait_for_widgets", "image_digest", "main",
]
