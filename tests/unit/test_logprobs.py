"""The chunked log-prob function against log_softmax + gather: values and gradients."""

import pytest
import torch

from atropos_verl.policy.logprobs import token_logprobs


def reference(logits, labels):
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_bytes", [4 * 37 * 3, 1 << 30])  # 3 rows per chunk (uneven) / one chunk
@pytest.mark.parametrize("inplace", [False, True])
def test_values_and_gradients_match_log_softmax(dtype, tolerance, chunk_bytes, inplace):
    torch.manual_seed(0)
    rows, vocab = 11, 37
    base = (torch.randn(rows, vocab) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    upstream = torch.randn(rows)

    logits = base.clone().requires_grad_(True)
    # The in-place variant writes the gradient into its input, as verl's engine allows;
    # an expression (not a leaf) is what the engine hands over.
    got = token_logprobs(logits * 1, labels, inplace_backward=inplace, chunk_bytes=chunk_bytes)
    (got * upstream).sum().backward()

    want_logits = base.double().clone().requires_grad_(True)
    want = reference(want_logits, labels)
    (want * upstream.double()).sum().backward()

    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=tolerance, rtol=tolerance)
    assert torch.allclose(logits.grad.double(), want_logits.grad, atol=tolerance, rtol=tolerance)


def test_keeps_leading_shape_and_handles_3d_input():
    logits = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    out = token_logprobs(logits, labels, chunk_bytes=4 * 13 * 4)
    assert out.shape == (2, 5)
    assert torch.allclose(out.double(), reference(logits, labels), atol=1e-5)
