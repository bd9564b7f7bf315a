"""``python -m rearlib``: the project's command-line tools, one line each (run ``python -m rearlib.<tool> --help``)."""

COMMANDS = (
    ("reproduce", "run the numbered notebooks with papermill and assemble reports/<scale>/ (make reproduce)"),
    ("train", "train a generator: plain AR, reAR or any ablation (torchrun for several GPUs)"),
    ("sample", "sample a generator, e.g. the 50k-image FID set, sharded over GPUs"),
    ("vapi", "VA-π post-training of a generator"),
    ("studies", "status / run / pack / unpack the training studies of notebooks 10-13"),
    ("zoo", "the shared per-scale models: tokens and AR / reAR generators"),
    ("vqgan", "train our VQ tokenizer"),
    ("pretokenize", "encode a dataset once into a token cache"),
    ("features", "train the in-project classifier (a diagnostic)"),
    ("analysis", "cost benchmark of the diagnosis analyses on a GPU"),
    ("bench", "training and sampling speed, fast paths against plain paths"),
    ("notebook", "pair notebooks/*.py with notebooks/*.ipynb (sync / check)"),
    ("widgets", "the teaching app's screenshots"),
)


def main() -> int:
    print("rearlib command-line tools (python -m rearlib.<tool> --help for each):\n")
    for name, what in COMMANDS:
        print(f"  python -m rearlib.{name:<12} {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
