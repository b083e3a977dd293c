"""The attention kernel against the PyTorch path, and row invariance of both."""

import pytest
import torch

from gorgon.models.attention import AttentionMetadata, kernel_available, paged_attention

needs_kernel = pytest.mark.skipif(
    not kernel_available(torch.float32, torch.device("cpu")), reason="CPU lacks AVX-512 kernels"
)
HEADS, KV_HEADS, D, SLOTS = 6, 2, 32, 3000


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(SLOTS, KV_HEADS, D, generator=g)
    v = torch.randn(SLOTS, KV_HEADS, D, generator=g)
    return k, v, g


def _run(q, k, v, seqs, use_kernel, window=None):
    """seqs: list of (slot list of the sequence, positions of its query rows); rows laid out in order."""
    seq_rows, seq_pos, row = [], [], 0
    for _, pos in seqs:
        seq_rows.append(list(range(row, row + len(pos))))
        seq_pos.append(list(pos))
        row += len(pos)
    meta = AttentionMetadata.build(
        seq_rows,
        seq_pos,
        [s for s, _ in seqs],
        [0] * row,
        HEADS // KV_HEADS,
        window,
        use_kernel,
        torch.device("cpu"),
    )
    return paged_attention(q, k, v, meta)


@needs_kernel
@pytest.mark.parametrize("window", [None, 40])
def test_kernel_matches_pytorch_path(window):
    k, v, g = _setup()
    perm = torch.randperm(SLOTS - 1, generator=g) + 1
    seqs = [
        (perm[:600].tolist(), range(590, 600)),
        (perm[600:620].tolist(), [19]),
        (perm[700:1000].tolist(), range(300)),
    ]
    q = torch.randn(311, HEADS, D, generator=g)
    fast = _run(q, k, v, seqs, True, window)
    ref = _run(q, k, v, seqs, False, window)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "pytorch"])
def test_rows_do_not_depend_on_company(use_kernel):
    if use_kernel and not kernel_available(torch.float32, torch.device("cpu")):
        pytest.skip("no kernel")
    k, v, g = _setup(1)
    slots = (torch.randperm(SLOTS - 1, generator=g) + 1)[:700].tolist()
    q = torch.randn(8, HEADS, D, generator=g)
    alone = [_run(q[i : i + 1], k, v, [(slots, [500 + i])], use_kernel)[0] for i in range(8)]
    together = _run(q, k, v, [(slots, range(500, 508))], use_kernel)
    other = slots[::-1]
    crowd = _run(
        torch.cat([torch.randn(3, HEADS, D), q]),
        k,
        v,
        [(other, [10, 300, 699]), (slots, range(500, 508))],
        use_kernel,
    )
    for i in range(8):
        assert torch.equal(together[i], alone[i])
        assert torch.equal(crowd[3 + i], alone[i])
