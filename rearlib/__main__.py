"""``python -m rearlib``: the project's command-line tools. ``python -m rearlib`` lists them;
``python -m rearlib <command> [options]`` runs one (``--help`` after the command explains its options)."""

from __future__ import annotations

import importlib
import sys

#: (command, module that implements it, what it does), in the order a new user meets them.
COMMANDS = (
    ("reproduce", "rearlib.experiments.reproduce",
     "run the numbered notebooks with papermill and assemble reports/<scale>/ (make reproduce)"),
    ("standins", "rearlib.experiments.standins",
     "write stand-in paper assets (random weights in the released layouts, an ImageNet-shaped folder)"),
    ("rehearse", "rearlib.experiments.rehearsal",
     "run every paper-capable notebook on stand-in assets and record time and memory"),
    ("train", "rearlib.train", "train a generator: plain AR, reAR or any ablation (torchrun for several GPUs)"),
    ("sample", "rearlib.sample", "sample a generator, e.g. the 50k-image FID set, sharded over GPUs"),
    ("vapi", "rearlib.vapi", "VA-π post-training of a generator"),
    ("studies", "rearlib.experiments.studies", "status / run / pack / unpack the training studies of notebooks 10-13"),
    ("zoo", "rearlib.experiments.zoo", "the shared per-scale models: tokens and AR / reAR generators"),
    ("vqgan", "rearlib.tokenizers.vqgan", "train or evaluate our VQ tokenizer"),
    ("pretokenize", "rearlib.tokenizers.pretokenize", "encode a dataset once into a token cache"),
    ("classifier", "rearlib.metrics.classifier", "train the in-project classifier (a diagnostic feature network)"),
    ("analysis", "rearlib.analysis.cost", "cost benchmark of the diagnosis analyses on a GPU"),
    ("bench", "rearlib.experiments.bench", "training and sampling speed, fast paths against plain paths"),
    ("notebook", "rearlib.experiments.notebook", "pair notebooks/*.py with notebooks/*.ipynb (sync / check)"),
    ("teaching", "rearlib.teaching.screenshots", "the teaching app's screenshots (Voila + Chromium)"),
)


def usage() -> str:
    lines = ["usage: python -m rearlib <command> [options]   (python -m rearlib <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<12} {what}" for name, _, what in COMMANDS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    modules = {name: module for name, module, _ in COMMANDS}
    if argv[0] not in modules:
        print(f"unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.argv = [f"python -m rearlib {argv[0]}"] + argv[1:]
    return importlib.import_module(modules[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
