"""Batch-invariant linear layers.

On x86 CPUs with AVX-512 (and AVX512-BF16 for bfloat16) a small C++ kernel (cpu_linear.cpp, compiled once
with torch's extension builder and cached) computes every output element with one fixed instruction sequence,
so row results never depend on the row count, and streams the weights once per call (fast decode).
Elsewhere the BLAS is used, with the row count padded to the multiple at which it was measured row-stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gorgon.kernels.build import cpu_extension as _extension


def kernel_available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and _extension() is not None


def row_multiple(dtype: torch.dtype, device: torch.device) -> int:
    """Row-count multiple that every linear input must be padded to for row-stable results.

    With the kernel: 1 (stable by construction). Otherwise, measured on CPU with torch 2.13 (oneDNN/MKL):
    bfloat16 GEMMs are row-stable for even row counts, float32 GEMMs for multiples of 4 (smaller counts take a
    GEMV path that rounds differently). Other devices get the conservative 4.
    """
    if kernel_available(dtype, device):
        return 1
    if device.type == "cpu" and dtype == torch.bfloat16:
        return 2
    return 4


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear over the last dim, through the invariant kernel when a packed weight is given."""
    if packed is None:
        return F.linear(x, weight, bias)
    shape = x.shape
    y = _extension().invariant_linear(x.reshape(-1, shape[-1]), packed, weight.shape[0], bias)
    return y.view(*shape[:-1], weight.shape[0])


class InvariantLinear(torch.nn.Linear):
    """nn.Linear whose inference path runs the batch-invariant kernel; under autograd it is plain F.linear.

    The packed copy of the weight is made on first use and remade if the weight is changed in place. A decode
    step calls ~120 of these: the checks per call are kept to a few attribute reads (they cost 7 us of a
    12.6 us call before, *script*).
    """

    _packed: torch.Tensor | None = None
    _packed_key: tuple = ()
    use_kernel = True  # False: always the BLAS (used to measure what batch invariance costs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # Under autograd (training heads through a frozen lm_head too) the kernel has no backward: F.linear.
        training = torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)
        packed = None if training or not self.use_kernel else self._packed_weight(w)
        if packed is None:
            return F.linear(x, w, self.bias)
        if x.dim() == 2:
            return _extension().invariant_linear(x, packed, w.shape[0], self.bias)
        return linear(x, w, self.bias, packed)

    def _packed_weight(self, w: torch.Tensor) -> torch.Tensor | None:
        """The kernel's packed copy of `w`, or None where the kernel cannot run it (dtype, device, CPU)."""
        key = (w.data_ptr(), w.dtype, weight_version(w))  # a new tensor, or this one changed in place
        if self._packed_key != key:
            self._packed = (
                _extension().pack_weight(w.detach()) if kernel_available(w.dtype, w.device) else None
            )
            self._packed_key = key
        return self._packed


def weight_version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be changed in place later)
        return -1
