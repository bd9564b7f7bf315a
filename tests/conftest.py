"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny matrices gain nothing from more threads, and on a shared 2-core box
    (CI, notebooks running beside the tests) spin-waiting threads made CPU tests many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smoke_parts():
    """The smoke tokenizer and classifier (shared artifact cache) and a random tiny generator of matching shapes."""
    from rearlib.metrics.classifier import get_classifier
    from rearlib.model import build_generator
    from rearlib.tokenizers import get_tokenizer

    tok = get_tokenizer("smoke", "cpu", progress=False)
    clf = get_classifier("smoke", "cpu")
    model = build_generator("tiny", codebook_size=tok.codebook_size, seq_len=tok.num_tokens, z_dim=tok.code_dim)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random everywhere: a fresh adaLN-Zero model would be nearly unconditional
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return tok, clf, model.eval()
