"""longkv's C kernels (longkv/kernels): results against float64 references and the PyTorch path, the fallback."""

from __future__ import annotations

import shutil

import pytest
import torch

from longkv import kernels
from longkv.attention import dense

needs_cc = pytest.mark.skipif(not kernels.available(), reason="no C compiler: longkv's CPU kernels are off")


def reference(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Decode attention in float64: q (H, 1, D) over the concatenated parts."""
    k = torch.cat([k for k, _ in parts], dim=1).double()
    v = torch.cat([v for _, v in parts], dim=1).double()
    h, _, d = q.shape
    g = h // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    p = torch.softmax(q.double() @ k.transpose(1, 2) * d**-0.5, dim=-1)
    return p @ v


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("h", "hkv", "d"), [(9, 3, 64), (14, 2, 64), (8, 8, 96), (32, 4, 128), (4, 1, 256), (6, 2, 20)])
@pytest.mark.parametrize("n", [1, 70, 3000])
def test_decode_attention_matches_float64(dtype: torch.dtype, h: int, hkv: int, d: int, n: int) -> None:
    torch.manual_seed(n + d)
    plane_k = torch.randn(hkv, n + 50, d).to(dtype)  # a pool plane: rows of a head are strided by its slots
    plane_v = torch.randn(hkv, n + 50, d).to(dtype)
    k, v = plane_k[:, 7 : 7 + n], plane_v[:, 11 : 11 + n]
    q = (torch.randn(h, 1, d) * 3).to(dtype)  # large scores: the online softmax must rescale
    out = kernels.decode_attention(q, [(k, v)], d**-0.5)
    assert out.shape == (h, 1, d) and out.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # bfloat16: the output's own rounding
    torch.testing.assert_close(out.double(), reference(q, [(k, v)]), atol=tol, rtol=tol)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_over_parts_equals_one_part(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    k = torch.randn(3, 1500, 64).to(dtype)
    v = torch.randn(3, 1500, 64).to(dtype)
    q = torch.randn(9, 1, 64).to(dtype)
    whole = kernels.decode_attention(q, [(k, v)], 0.125)
    cuts = [(k[:, :300], v[:, :300]), (k[:, 300:300], v[:, 300:300]), (k[:, 300:1111], v[:, 300:1111]), (k[:, 1111:], v[:, 1111:])]
    parts = kernels.decode_attention(q, cuts, 0.125)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(parts.float(), whole.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(parts.double(), reference(q, cuts), atol=tol * 2, rtol=tol * 2)


@needs_cc
def test_dense_decode_paths_agree_with_and_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """attend_segments and attend_decode_batch give the same output from the C kernel and from PyTorch ops."""
    torch.manual_seed(1)
    segs = [(torch.randn(2, n, 64), torch.randn(2, n, 64), torch.arange(at, at + n)) for at, n in ((0, 400), (400, 333))]
    other = [(torch.randn(2, 900, 64), torch.randn(2, 900, 64), torch.arange(900))]
    q = torch.randn(8, 2, 64)
    pos = torch.tensor([733])
    with_k = (dense.attend_segments(q[:, :1], segs, pos), dense.attend_decode_batch(q, [segs, other]))
    monkeypatch.setenv("LONGKV_KERNELS", "0")
    assert not kernels.available()
    without = (dense.attend_segments(q[:, :1], segs, pos), dense.attend_decode_batch(q, [segs, other]))
    for a, b in zip(with_k, without, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


@needs_cc
def test_limits_are_refused_not_miscomputed() -> None:
    q = torch.randn(66, 1, 64)  # 33 query heads per KV head: past the kernel's group limit
    k = torch.randn(2, 10, 64)
    assert not kernels.supports(q, k)
    with pytest.raises(ValueError, match="beyond the kernel's limits"):
        kernels.decode_attention(q, [(k, k)], 0.125)
    assert not kernels.supports(torch.randn(4, 2, 64), k)  # two queries per head: not a decode step
    assert not kernels.supports(torch.randn(4, 1, 64), k.half())  # float16 pages: PyTorch's path
    with pytest.raises(ValueError, match="one dtype"):
        kernels.decode_attention(torch.randn(4, 1, 64), [(k, k), (k.bfloat16(), k.bfloat16())], 0.125)


def test_a_failing_compiler_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("LONGKV_HOME", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    assert not kernels.available()
    assert "building longkv's CPU kernels failed" in caplog.text
    assert not any((tmp_path / "kernels").glob("*")), "a failed build leaves nothing behind"
    assert not kernels.supports(torch.randn(4, 1, 64), torch.randn(2, 5, 64))
    with pytest.raises(ValueError, match="kernels are off"):
        kernels.decode_attention(torch.randn(4, 1, 64), [(torch.randn(2, 5, 64),) * 2], 0.125)
