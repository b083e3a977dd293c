"""The attention kernel against the PyTorch path, and row invariance of both."""

import pytest
import torch

from gorgon.models.attention import AttentionMetadata, kernel_available, paged_attention

needs_kernel = pytest.mark.skipif(
    not kernel_available(torch.float32, torch.device("cpu")), reason="CPU lacks AVX-512 kernels"
)
HEADS, KV_HEADS, D, SLOTS = 6, 2, 32, 3000


KV_DTYPES = pytest.mark.parametrize(
    "kv_dtype", [torch.float32, torch.bfloat16], ids=["f32cache", "bf16cache"]
)


def _setup(seed=0, kv_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(SLOTS, KV_HEADS, D, generator=g)
    v = torch.randn(SLOTS, KV_HEADS, D, generator=g)
    return k.to(kv_dtype), v.to(kv_dtype), g


def _run(q, k, v, seqs, use_kernel, window=None, groups=None):
    """seqs: list of (slot list of the sequence, positions of its query rows); rows laid out in order.
    groups: per sequence, the first sequence of its group (rows that share a key prefix)."""
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
        seq_group=groups,
    )
    return paged_attention(q, k, v, meta)


@needs_kernel
@KV_DTYPES
@pytest.mark.parametrize("window", [None, 40])
def test_kernel_matches_pytorch_path(window, kv_dtype):
    k, v, g = _setup(0, kv_dtype)
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


@KV_DTYPES
@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "pytorch"])
def test_rows_do_not_depend_on_company(use_kernel, kv_dtype):
    if use_kernel and not kernel_available(kv_dtype, torch.device("cpu")):
        pytest.skip("no kernel")
    k, v, g = _setup(1, kv_dtype)
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


@needs_kernel
@KV_DTYPES
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("root", [255, 600, 1021])
def test_tree_rows_sharing_a_prefix_match_rows_alone(window, root, kv_dtype):
    """A sequence's row and its candidate-tree rows, tiled together (keys gathered once from the deepest row's
    slots), give exactly the bits each row gets alone, with the same keys, across block boundaries too."""
    k, v, g = _setup(2, kv_dtype)
    perm = (torch.randperm(SLOTS - 1, generator=g) + 1).tolist()
    prefix, node_slots = perm[: root + 1], perm[root + 1 : root + 9]
    ancestors = [[], [0], [0, 1], [0, 1, 2], [4], [4, 5]]  # tree nodes by their ancestors (node indices)
    seqs = [(prefix, [root])]
    for i, chain in enumerate(ancestors):
        seqs.append((prefix + [node_slots[a] for a in chain] + [node_slots[i]], [root + len(chain) + 1]))
    q = torch.randn(len(seqs), HEADS, D, generator=g)
    together = _run(q, k, v, seqs, True, window, groups=[0] * len(seqs))
    ref = _run(q, k, v, seqs, False, window)
    torch.testing.assert_close(together, ref, atol=1e-5, rtol=1e-5)
    for i, seq in enumerate(seqs):
        alone = _run(q[i : i + 1], k, v, [seq], True, window)[0]
        assert torch.equal(together[i], alone), f"row {i}"
    # and inside a crowd of other groups (another sequence's prefill rows before it)
    other = perm[2000:2400]
    crowd = _run(
        torch.cat([torch.randn(40, HEADS, D, generator=g), q]),
        k,
        v,
        [(other, range(360, 400))] + seqs,
        True,
        window,
        groups=[0] + [1] * len(seqs),
    )
    assert torch.equal(crowd[40:], together)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,d", [(8, 1, 64), (4, 4, 80), (10, 2, 128), (2, 2, 16)])
def test_kernel_head_layouts(heads, kv_heads, d):
    """Grouped-query ratios 8, 1 and 5 and head sizes that are not a multiple of 64 against the PyTorch path."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(SLOTS, kv_heads, d, generator=g)
    v = torch.randn(SLOTS, kv_heads, d, generator=g)
    slots = (torch.randperm(SLOTS - 1, generator=g) + 1)[:700].tolist()
    rows, pos = [list(range(9)), [9]], [list(range(600, 609)), [20]]
    tables = [slots, slots[::-1][:21]]
    q = torch.randn(10, heads, d, generator=g)
    out = {}
    for use_kernel in (True, False):
        meta = AttentionMetadata.build(
            rows, pos, tables, [0] * 10, heads // kv_heads, None, use_kernel, torch.device("cpu")
        )
        out[use_kernel] = paged_attention(q, k, v, meta)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("window", [None, 300])
def test_a_bfloat16_cache_is_read_as_exactly_its_float32_values(window):
    """Reading a bfloat16 cache widens each value exactly: the same bits as a float32 cache holding the
    rounded values, for plain rows and for tree rows that re-score their own ancestors' keys."""
    k, v, g = _setup(4, torch.bfloat16)
    perm = (torch.randperm(SLOTS - 1, generator=g) + 1).tolist()
    prefix, node = perm[:700], perm[700:703]
    seqs = [
        (perm[1000:1600], range(590, 600)),
        (prefix, [699]),
        (prefix + node[:1], [700]),
        (prefix + node, [702]),
    ]
    q = torch.randn(13, HEADS, D, generator=g)
    groups = [0, 1, 1, 1]
    assert torch.equal(
        _run(q, k, v, seqs, True, window, groups), _run(q, k.float(), v.float(), seqs, True, window, groups)
    )


@needs_kernel
def test_a_position_beyond_the_slot_table_is_an_error_not_a_crash():
    k, v, _ = _setup(5)
    meta = AttentionMetadata.build(
        [[0]], [[10]], [list(range(1, 12))], [0], HEADS // KV_HEADS, None, True, torch.device("cpu")
    )
    meta.row_pos[0] = meta.slot_table.shape[1]  # past the table's columns
    with pytest.raises(RuntimeError, match="beyond the slot table"):
        paged_attention(torch.randn(1, HEADS, D), k, v, meta)
