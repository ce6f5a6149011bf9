"""longkv's C kernels (longkv/kernels): results against float64 references and the PyTorch path, the fallback."""

from __future__ import annotations

import ctypes
import itertools
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import random_llama_weights

from longkv import kernels
from longkv.attention import dense
from longkv.config import AttnSpec, ModelConfig
from longkv.kv.pool import PagePool
from longkv.kv.quant import CodedRows, SeenAt, coded_format
from longkv.models import build
from longkv.models.layers import Rotary, dequantize_int4, quantize_int4
from longkv.policies import make_policy

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
# d = 80: 16-wide paired loops where AVX-512 reads 32 at a time; 20: no paired loops
@pytest.mark.parametrize(("h", "hkv", "d"), [(9, 3, 64), (14, 2, 64), (8, 8, 96), (10, 2, 80), (32, 4, 128), (4, 1, 256), (6, 2, 20)])
@pytest.mark.parametrize("n", [1, 70, 3000])
def test_decode_attention_matches_float64(dtype: torch.dtype, h: int, hkv: int, d: int, n: int) -> None:
    torch.manual_seed(n + d)
    plane_k = torch.randn(hkv, n + 50, d).to(dtype)  # a pool plane: rows of a head are strided by its slots
    plane_v = torch.randn(hkv, n + 50, d).to(dtype)
    k, v = plane_k[:, 7 : 7 + n], plane_v[:, 11 : 11 + n]
    q = (torch.randn(h, 1, d) * 3).to(dtype)  # large scores: the online softmax must rescale
    out = kernels.decode_attention(q, [[(k, v)]], d**-0.5)
    assert out.shape == (h, 1, d) and out.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # bfloat16: the output's own rounding
    torch.testing.assert_close(out.double(), reference(q, [(k, v)]), atol=tol, rtol=tol)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 80, 20])  # 32-wide, 16-wide and plain loops
def test_decode_attention_over_parts_equals_one_part_bit_for_bit(dtype: torch.dtype, d: int) -> None:
    """Blocks sit at fixed offsets of the concatenation: cutting the keys into parts anywhere (a prefix-cache
    hit ending mid-page, pages that are not neighbours) changes no bit of the output."""
    torch.manual_seed(d)
    k = torch.randn(3, 1500, d).to(dtype)
    v = torch.randn(3, 1500, d).to(dtype)
    q = torch.randn(9, 1, d).to(dtype)
    whole = kernels.decode_attention(q, [[(k, v)]], d**-0.5)
    for edges in ([0, 300, 300, 1111, 1500], [0, 1, 37, 64, 65, 129, 700, 1499, 1500], [*range(0, 1501, 7), 1500]):
        cuts = [(k[:, a:b], v[:, a:b]) for a, b in itertools.pairwise(edges)]
        assert torch.equal(kernels.decode_attention(q, [cuts], d**-0.5), whole), edges
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(whole.double(), reference(q, [(k, v)]), atol=tol * 2, rtol=tol * 2)


@needs_cc
def test_int8_parts_equal_one_part_and_the_threads_change_nothing() -> None:
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 1000, 64, generator=g).bfloat16(), torch.randn(2, 1000, 64, generator=g).bfloat16()
    q = torch.randn(8, 1, 64, generator=g)  # float32 out: no rounding hides a difference
    rows, _ = coded_rows(k, v, "int8")
    (a, _), (b, _) = coded_rows(k[:, :333], v[:, :333], "int8"), coded_rows(k[:, 333:], v[:, 333:], "int8")
    whole = kernels.decode_attention(q, [[(rows, rows)]], 0.125)
    assert torch.equal(kernels.decode_attention(q, [[(a, a), (b, b)]], 0.125), whole)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.decode_attention(q, [[(rows, rows)]], 0.125), kernels.decode_attention(q, [[(k, v)]], 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], whole) and torch.equal(one[1], kernels.decode_attention(q, [[(k, v)]], 0.125))


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_of_a_batch_equals_each_sequence_alone(dtype: torch.dtype) -> None:
    """One call for B ragged sequences (long ones, one in two parts, one empty) gives each sequence's own
    attention bit for bit: a lone sequence is cut into the same chunks as in a batch."""
    g = torch.Generator().manual_seed(3)
    lens = [1200, 5, 0, 700]

    def kv(n: int) -> torch.Tensor:
        return torch.randn(2, n, 64, generator=g).to(dtype)

    plans = []
    for n in lens:
        k, v = kv(n), kv(n)
        plans.append([(k[:, : n // 3], v[:, : n // 3]), (k[:, n // 3 :], v[:, n // 3 :])] if n == 700 else [(k, v)])
    q = torch.randn(8, len(lens), 64, generator=g).to(dtype)
    out = kernels.decode_attention(q, plans, 0.125)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for b, parts in enumerate(plans):
        alone = kernels.decode_attention(q[:, b : b + 1].contiguous(), [parts], 0.125)
        assert torch.equal(out[:, b : b + 1], alone), b
        if lens[b]:
            torch.testing.assert_close(out[:, b : b + 1].double(), reference(q[:, b : b + 1], parts), atol=2 * tol, rtol=2 * tol)
        else:
            assert not out[:, b].any()
    with pytest.raises(ValueError, match="3 query columns for 2 sequences"):
        kernels.decode_attention(torch.randn(8, 3, 64), plans[:2], 0.125)


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


def appended(lkv, steps: list[tuple[torch.Tensor, torch.Tensor]], c_write: bool, at: int, gap: int):
    """``lkv`` after appending every (k, v) of ``steps`` (positions from ``at``, ``gap`` skipped between steps), through
    the C append (``c_write``) or PyTorch's copies."""
    assert lkv._c_write
    lkv._c_write = c_write
    for k, v in steps:
        lkv.append(k, v, torch.arange(at, at + k.shape[1]))
        at += k.shape[1] + gap
    return lkv


@needs_cc
def test_cache_appends_in_one_call_write_what_the_pytorch_copy_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """LayerKV.append through kernels.kv_write (one C call) against the PyTorch slice copies: the same keys,
    values and positions in the pool's slots, for a prefill chunk, strided decode rows and a page boundary;
    rows of another dtype than the pages are left to PyTorch's copy (which casts)."""
    from longkv.kv.cache import LayerKV

    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(5, 5, 32, generator=g).bfloat16()  # (heads, T, D): k and v as strided views of one tensor
    steps = [(torch.randn(2, 60, 32, generator=g).bfloat16(), torch.randn(2, 60, 32, generator=g).bfloat16())]
    steps += [(qkv[1:3, t : t + 1], qkv[3:5, t : t + 1]) for t in range(5)]  # crosses the 64-slot page
    steps += [(torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 32, generator=g))]  # float32 rows

    fast, slow = (appended(LayerKV(2, 32, 64, torch.bfloat16), steps, c_write, at=100, gap=3) for c_write in (True, False))
    assert fast.n == slow.n == 66
    for a, b in zip(fast.view(), slow.view(), strict=True):
        assert torch.equal(a, b)
    assert int(fast.positions()[-1]) == 100 + 66 + 3 * 6 - 1
    assert not kernels.kv_write(*fast.pool.planes.values(), fast.pool.pos, 0, *steps[-1], torch.arange(1))  # float32 rows


def coded_rows(k: torch.Tensor, v: torch.Tensor, codec: str, slot: int = 5) -> tuple[CodedRows, PagePool]:
    """k, v (Hkv, N, D) coded into a fresh pool's planes at ``slot`` (PyTorch's coder) and read back as CodedRows."""
    hkv, n, d = k.shape
    fmt = coded_format(d, k.dtype, codec)
    pool = PagePool(hkv, fmt, 64)
    pool._resize(-(-(n + slot) // 64))
    for name, x in fmt.encode(k, v).items():
        pool.planes[name][:, slot : slot + n] = x
    return CodedRows(fmt, {name: t[:, slot : slot + n] for name, t in pool.planes.items()}), pool


def dequantized64(rows: CodedRows) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values int8 rows stand for, in float64 (code * step + min)."""
    p, g = rows.planes, rows.fmt.group

    def one(c: torch.Tensor, step: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        h, n, d = c.shape
        x = c.double().reshape(h, n, d // g, g) * step.double()[..., None] + lo.double()[..., None]
        return x.reshape(h, n, d)

    return one(p["k"], p["k_step"], p["k_min"]), one(p["v"], p["v_step"], p["v_min"])


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("h", "hkv", "d"), [(9, 3, 64), (14, 2, 64), (8, 8, 96), (4, 1, 256), (6, 2, 20), (12, 2, 128)])
def test_int8_pages_are_read_as_codes(dtype: torch.dtype, h: int, hkv: int, d: int) -> None:
    """Decode attention over int8 pages read in place (decoded block by block inside the kernel) equals attention
    over the values the codes stand for; head_dim 20 (groups of 20) takes the kernel's unpaired path."""
    torch.manual_seed(d + h)
    k, v = (torch.randn(hkv, 700, d) * 2).to(dtype), torch.randn(hkv, 700, d).to(dtype)
    rows, _ = coded_rows(k, v, "int8")
    assert rows.shape == (hkv, 700, d)
    q = (torch.randn(h, 1, d) * 3).to(dtype)
    assert kernels.supports(q, rows)
    out = kernels.decode_attention(q, [[(rows, rows)]], d**-0.5)
    assert out.shape == (h, 1, d) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), reference(q, [dequantized64(rows)]), atol=tol, rtol=tol)
    kd, vd = rows.decode()  # the PyTorch decode of the same rows agrees too (to its dtype's rounding)
    torch.testing.assert_close(out.float(), kernels.decode_attention(q, [[(kd, vd)]], d**-0.5).float(), atol=4 * tol, rtol=4 * tol)


@needs_cc
def test_a_batch_mixes_int8_bfloat16_and_float32_parts() -> None:
    """One call over sequences whose parts differ in format (an int8 prefix then bfloat16 rows; float32 rows;
    int8 rows alone) gives each sequence's own attention (each keeps its queries in the order of its rows)."""
    g = torch.Generator().manual_seed(8)
    k, v = torch.randn(2, 900, 64, generator=g).bfloat16(), torch.randn(2, 900, 64, generator=g).bfloat16()
    rows, _ = coded_rows(k[:, :600], v[:, :600], "int8")
    kf, vf = torch.randn(2, 300, 64, generator=g), torch.randn(2, 300, 64, generator=g)
    plans = [[(rows, rows), (k[:, 600:], v[:, 600:])], [(kf, vf)], [(rows, rows)]]
    q = torch.randn(8, 3, 64, generator=g)
    out = kernels.decode_attention(q, plans, 0.125)
    k8, v8 = dequantized64(rows)
    refs = [[(k8, v8), (k[:, 600:], v[:, 600:])], [(kf, vf)], [(k8, v8)]]
    for b in range(3):
        torch.testing.assert_close(
            out[:, b : b + 1].double(), reference(q[:, b : b + 1], refs[b]), atol=1e-5, rtol=1e-5
        )
    alone = kernels.decode_attention(q[:, :1].contiguous(), plans[:1], 0.125)  # the paired order: same answer
    torch.testing.assert_close(out[:, :1], alone, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_coded_appends_write_what_pytorch_codes(codec: str, dtype: torch.dtype) -> None:
    """LayerKV.append on coded pages through kernels.kv_write_coded (one C call) writes the very codes, steps and
    minimums of longkv.kv.quant.quantize, for a prefill chunk and strided decode rows across a page boundary."""
    from longkv.kv.cache import LayerKV

    g = torch.Generator().manual_seed(5)
    qkv = (torch.randn(5, 6, 32, generator=g) * 4).to(dtype)
    steps = [((torch.randn(2, 61, 32, generator=g) * 3).to(dtype), torch.randn(2, 61, 32, generator=g).to(dtype))]
    steps += [(qkv[1:3, t : t + 1], qkv[3:5, t : t + 1]) for t in range(6)]
    steps += [(torch.full((2, 1, 32), 0.75, dtype=dtype), torch.zeros(2, 1, 32, dtype=dtype))]  # constant groups

    assert LayerKV(2, 32, 64, dtype, codec=codec)._coded_reads == (codec == "int8")
    fast, slow = (appended(LayerKV(2, 32, 64, dtype, codec=codec), steps, c_write, at=10, gap=2) for c_write in (True, False))
    assert fast.n == slow.n == 68
    for name, plane in fast.pool.planes.items():
        assert torch.equal(plane[:, :68], slow.pool.planes[name][:, :68]), name
    assert torch.equal(fast.positions(), slow.positions())
    for a, b in zip(fast.view(), slow.view(), strict=True):
        assert torch.equal(a, b)


@needs_cc
@pytest.mark.parametrize("spec", ["dense:kv_quant=int8", "streaming:budget=64,sinks=4,kv_quant=int8"])
def test_int8_kv_decode_reads_codes_and_matches_decoded_pages(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kv_quant=int8 run (prefill, then greedy decode) whose decode steps read the pages as codes gives the
    logits of the same run reading PyTorch-decoded pages, within float32 rounding. Under streaming the sinks'
    keys move at every step: they stay codes too (``SeenAt``: the kernel turns the query for them)."""
    from longkv.kv.cache import LayerKV
    from tests.test_policies import ids, run, tiny_model

    model = tiny_model("qwen2", seed=4)
    prompt = ids(150, seed=6)
    seen: list[bool] = []
    plain_rows: list[int] = []
    real = kernels.decode_attention

    def spy(q: torch.Tensor, plans: list, scale: float) -> torch.Tensor:
        seen.append(any(isinstance(getattr(k, "keys", k), CodedRows) for parts in plans for k, _ in parts))
        plain_rows.append(sum(k.shape[1] for parts in plans for k, _ in parts if not isinstance(getattr(k, "keys", k), CodedRows)))
        return real(q, plans, scale)

    monkeypatch.setattr(kernels, "decode_attention", spy)
    _, coded = run(model, make_policy(spec), prompt, steps=6)
    assert seen and all(seen)
    assert set(plain_rows) == {0}
    seen.clear()
    real_init = LayerKV.__init__

    def decoding_init(self: LayerKV, *a: object, **kw: object) -> None:
        real_init(self, *a, **kw)
        self._coded_reads = False

    monkeypatch.setattr(LayerKV, "__init__", decoding_init)
    _, plain = run(model, make_policy(spec), prompt, steps=6)
    assert seen and not any(seen)
    torch.testing.assert_close(coded, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["streaming:budget=40,sinks=4", "snapkv:budget=48,window=8", "streaming:budget=40,sinks=4,kv_quant=int8"])
def test_a_decode_read_rotates_the_keys_that_move_and_reads_the_rest_in_place(spec: str) -> None:
    """The parts a decode step reads are the cache's keys rotated to the policy's positions, bit for bit those of
    rotating the whole cache (the moved keys are a prefix: StreamingLLM's sinks, a compressed cache's older tokens)."""
    from longkv.engine.runner import Runner
    from longkv.kv.quant import decoded
    from tests.test_policies import ENGINE, ids, run, tiny_model

    model = tiny_model("llama", seed=2)
    policy = make_policy(spec).resolve(model.config, ENGINE)
    seq, _ = run(model, policy, ids(120, seed=3), steps=3)
    runner = Runner(model, policy, ENGINE)
    read = runner._read_fn(seq)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    parts = decoded(read(0, torch.randn(4, 1, 16, generator=g), k, v, torch.tensor([seq.next_position])))
    keys, values, kpos = seq.cache[0].view()
    target = policy.key_positions(kpos)
    assert target is not None and int(torch.count_nonzero(target - kpos)) >= 4  # some keys do move
    torch.testing.assert_close(torch.cat([p[0] for p in parts], dim=1), runner._rotate_to(0, keys, kpos, target), atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], dim=1), values, atol=0, rtol=0)
    assert torch.equal(torch.cat([p[2] for p in parts]), kpos)


@needs_cc
def test_limits_are_refused_not_miscomputed() -> None:
    q = torch.randn(66, 1, 64)  # 33 query heads per KV head: past the kernel's group limit
    k = torch.randn(2, 10, 64)
    assert not kernels.supports(q, k)
    with pytest.raises(ValueError, match="beyond the kernel's limits"):
        kernels.decode_attention(q, [[(k, k)]], 0.125)
    assert not kernels.supports(torch.randn(4, 2, 64), k)  # two queries per head: not a decode step
    assert not kernels.supports(torch.randn(4, 1, 64), k.half())  # float16 pages: PyTorch's path
    with pytest.raises(ValueError, match="bfloat16 or float32 keys"):
        kernels.decode_attention(torch.randn(4, 1, 64), [[(k, k), (k.half(), k.half())]], 0.125)
    int4 = coded_rows(k.bfloat16(), k.bfloat16(), "int4")[0]
    assert not kernels.supports(torch.randn(4, 1, 64), int4)  # int4 pages are decoded by PyTorch first


def test_a_failing_compiler_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("LONGKV_HOME", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    assert not kernels.available()
    assert "building longkv's CPU kernels with" in caplog.text and "exit code 1" in caplog.text
    assert not any((tmp_path / "kernels").glob("*.so")), "a failed build leaves no library behind"
    [failed] = (tmp_path / "kernels").glob("*.failed")  # remembered: the next process does not retry
    caplog.clear()
    monkeypatch.setattr(kernels, "_tried", False)
    assert not kernels.available()
    assert "failed before" in caplog.text and str(failed) in caplog.text
    assert not kernels.supports(torch.randn(4, 1, 64), torch.randn(2, 5, 64))
    with pytest.raises(ValueError, match="kernels are off"):
        kernels.decode_attention(torch.randn(4, 1, 64), [[(torch.randn(2, 5, 64),) * 2]], 0.125)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 40])
def test_add_rms_norm_matches_torch(dtype: torch.dtype, t: int) -> None:
    torch.manual_seed(t)
    x = torch.randn(t, 96).to(dtype)
    delta = torch.randn(t, 96).to(dtype)
    w = (torch.rand(96) + 0.5).to(dtype)
    want_x = x + delta
    want = F.rms_norm(want_x, (96,), w, 1e-6)
    got = kernels.add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(x, want_x), "the residual add is done in place, rounded like PyTorch's"
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(kernels.add_rms_norm(x, None, w, 1e-6), want, atol=tol, rtol=tol)


@needs_cc
@pytest.mark.parametrize("t", [1, 40])
def test_add_rms_norm_with_float32_weights_under_bfloat16_is_gemmas_norm(t: int) -> None:
    """Gemma keeps 1 + w in float32 under bfloat16 activations: the kernel gives norm32's result (float32
    arithmetic, one rounding) exactly where a bfloat16 weight would lose w's low bits."""
    from longkv.models.gemma3 import norm32

    torch.manual_seed(t)
    x = torch.randn(t, 640).to(torch.bfloat16)
    delta = torch.randn(t, 640).to(torch.bfloat16)
    w = 1.0 + torch.randn(640) * 1e-3  # float32; rounded to bfloat16 most of w would be lost
    want_x = x + delta
    got = kernels.add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(x, want_x) and got.dtype == torch.bfloat16
    want = norm32(want_x, w, 1e-6)
    assert (got.float() - want.float()).abs().max().item() <= 2 ** -7 * want.float().abs().max().item()
    assert (got == want).float().mean().item() > 0.99, "one rounding, like norm32: nearly every value identical"


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("t", "rotary"), [(1, 64), (40, 64), (5, 32)])
def test_rope_matches_rotary_apply(dtype: torch.dtype, t: int, rotary: int) -> None:
    torch.manual_seed(t)
    heads, d = 6, 64
    qkv = torch.randn(t, heads * d + 2 * d).to(dtype)  # rows of a projection: 6 rotated heads, then values
    angles = torch.arange(t)[:, None] * (1e4 ** (-torch.arange(0, rotary, 2) / rotary))[None, :]
    cos, sin = angles.cos(), angles.sin()
    got = kernels.rope(qkv[:, : heads * d], heads, d, cos, sin)
    want = Rotary.apply(qkv[:, : heads * d].view(t, heads, d).transpose(0, 1).float(), cos, sin)
    assert got.shape == (heads, t, d) and got.is_contiguous()
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@needs_cc
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_equals_the_op_by_op_forward(arch: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """LlamaModel's fused CPU forward (add+norm and RoPE kernels) against its PyTorch-ops forward."""
    cfg = ModelConfig(
        arch=arch, vocab_size=97, hidden_size=64, intermediate_size=96, n_layers=3, n_heads=4, n_kv_heads=2,
        head_dim=16, max_position=2048, eos_token_ids=(0,), qk_norm=arch == "qwen3",
    )  # fmt: skip
    w = random_llama_weights(cfg, 3, 0.3)
    g = torch.Generator().manual_seed(4)
    for name in list(w):
        if name.endswith("norm.weight"):
            w[name] = torch.rand(cfg.hidden_size, generator=g) + 0.5
    for i in range(cfg.n_layers if arch == "qwen3" else 0):
        for n in ("q_norm", "k_norm"):
            w[f"model.layers.{i}.self_attn.{n}.weight"] = torch.rand(cfg.head_dim, generator=g) + 0.5
    model = build(cfg, {k: v.to(dtype) for k, v in w.items()})
    ids = torch.randint(1, 97, (50,), generator=g)
    pos = torch.arange(50)

    def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return dense.attend(q, k, v, p, p)

    fused = model.forward(ids, pos, attention, "all")
    monkeypatch.setenv("LONGKV_KERNELS", "0")
    plain = model.forward(ids, pos, attention, "all")
    assert fused is not None and plain is not None
    if dtype == torch.float32:
        torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
        return
    # bfloat16: rounding differs (RoPE rounds once, not after every product), so both are held to the
    # float32 forward of the same (bfloat16-valued) weights: the fused one must be no less accurate
    exact = build(cfg, {k: v.to(dtype).float() for k, v in w.items()}).forward(ids, pos, attention, "all")
    assert exact is not None
    err_fused, err_plain = (fused - exact).abs().mean(), (plain - exact).abs().mean()
    assert err_fused <= 1.1 * err_plain, (err_fused, err_plain)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("decode", "bias"), [("int4", False), ("int8", True)])
def test_layer_halves_in_one_call_equal_the_kernel_by_kernel_forward(dtype: torch.dtype, decode: str, bias: bool) -> None:
    """Decode rows through attn_in / attn_out_mlp (one call per half layer) against the same layers op by op."""
    cfg = ModelConfig(
        arch="qwen2" if bias else "llama", vocab_size=97, hidden_size=64, intermediate_size=96, n_layers=3, n_heads=4,
        n_kv_heads=2, head_dim=16, max_position=2048, eos_token_ids=(0,), attention_bias=bias,
    )  # fmt: skip
    w = random_llama_weights(cfg, 5, 0.3)
    g = torch.Generator().manual_seed(6)
    for i in range(cfg.n_layers if bias else 0):
        for n, size in (("q", 64), ("k", 32), ("v", 32)):
            w[f"model.layers.{i}.self_attn.{n}_proj.bias"] = torch.randn(size, generator=g) * 0.3
    ids = torch.randint(1, 97, (6,), generator=g)  # 6 rows: a decode step's few rows
    pos = torch.arange(6)

    def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return dense.attend(q, k, v, p, p)

    def run(weights_dtype: torch.dtype, one_call: bool) -> torch.Tensor:
        model = build(cfg, {k: v.to(dtype).to(weights_dtype) for k, v in w.items()}, decode_weights=decode)
        for L in model.layers:
            assert L.fused_in is not None and L.fused_out is not None
            if not one_call:
                L.fused_in = L.fused_out = None
        out = model.forward(ids, pos, attention, "all")
        assert out is not None
        return out

    fused, split = run(dtype, True), run(dtype, False)
    if dtype == torch.float32:
        torch.testing.assert_close(fused, split, atol=2e-4, rtol=2e-4)
        return
    # bfloat16: the one-call halves keep float32 rows between their steps, so they must be no less accurate
    exact = run(torch.float32, True)  # the same bfloat16-valued weights, float32 activations
    err_fused, err_split = (fused - exact).abs().mean(), (split - exact).abs().mean()
    assert err_fused <= 1.1 * err_split, (err_fused, err_split)


def _coded_x(x: torch.Tensor) -> torch.Tensor:
    """x as block_linear codes it: per block of 32, round(x / s) * s with s = max |x| / 127 (float64)."""
    xb = x.double().reshape(x.shape[0], -1, 32)
    s = (xb.abs().amax(-1, keepdim=True).float() / 127).double()  # the kernel's float32 scale
    return (torch.round(xb / s.clamp_min(1e-30)) * s).reshape(x.shape)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # 11: a second pass over W for rows 9-11
def test_block_linear_is_the_exact_product_of_the_coded_x(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    n, k = 130, 192
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(rows, k, generator=g).to(dtype)
    codes, step, lo = quantize_int4(w, 32)
    w4 = dequantize_int4(codes, step.half().float(), lo.half().float(), 32)  # step and minimum stored as float16
    p8 = kernels.pack_q8(w)
    codes8, scale8 = _untile_q8(p8, n, k)
    w8 = (codes8.float().reshape(n, k // 32, 32) * scale8[..., None]).reshape(n, k)
    assert (w8 - w).abs().max() <= scale8.max() / 2 * 1.01  # Q8_0 codes: within half a step of w
    for bits, ref_w, packed in ((4, w4, kernels.pack_q4(codes, step, lo)), (8, w8, p8)):
        got = kernels.block_linear(x, packed, n, k, bits)
        assert got.shape == (rows, n) and got.dtype == dtype
        want = _coded_x(x) @ ref_w.double().T
        tol = 1e-5 if dtype == torch.float32 else 8e-3  # float32 sums; bfloat16: the output's rounding
        torch.testing.assert_close(got.double(), want, atol=tol * float(want.abs().max()), rtol=tol)


def _untile(tiles: torch.Tensor, n: int, k: int, tile: int, code_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles of pack_q4 / pack_q8 read back, as the kernel's docs describe them: code bytes
    (N, K/32, 8 chunks, 4) and the float16 values after them (N, K/32, per-row values)."""
    g = -(-n // 8)
    t = tiles.reshape(g, k // 32, tile)
    code = t[..., :code_bytes].reshape(g, k // 32, code_bytes // 32, 8, 4).permute(0, 3, 1, 2, 4)  # (G, 8 rows, K/32, c, 4)
    halves = t[..., code_bytes:].contiguous().view(torch.float16).float().reshape(g, k // 32, -1, 8).permute(0, 3, 1, 2)
    return code.reshape(g * 8, k // 32, code_bytes // 32, 4)[:n], halves.reshape(g * 8, k // 32, -1)[:n]


def _untile_q8(tiles: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    code, scale = _untile(tiles, n, k, kernels.Q8_TILE, 256)
    return code.contiguous().view(torch.int8).reshape(n, k), scale[..., 0]


@needs_cc
@pytest.mark.parametrize("n", [3, 8, 21])  # 3 and 21: the last tile padded with zero rows
def test_pack_layouts_hold_every_code(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 16, (n, 64), generator=g)
    step, lo = torch.rand(n, 2, generator=g) + 0.1, -torch.rand(n, 2, generator=g)
    p = kernels.pack_q4(codes, step, lo)
    assert p.dtype == torch.uint8 and p.shape == (-(-n // 8), 2 * 160)
    nib, halves = _untile(p, n, 64, kernels.Q4_TILE, 128)  # (n, 2, 4 chunks, 4), (n, 2, 2)
    got = torch.cat(((nib & 15).long(), (nib >> 4).long()), dim=2).reshape(n, 64)  # chunks 0-3 low, 4-7 high
    assert torch.equal(got, codes)
    torch.testing.assert_close(halves[..., 0], step.half().float())
    torch.testing.assert_close(halves[..., 1], lo.half().float())
    w = torch.randn(n, 64, generator=g)
    q8 = kernels.pack_q8(w)
    assert q8.shape == (-(-n // 8), 2 * 272)
    code8, scale8 = _untile_q8(q8, n, 64)
    torch.testing.assert_close(scale8, (w.reshape(n, 2, 32).abs().amax(-1) / 127).half().float())
    assert torch.equal(code8, (w.reshape(n, 2, 32) / scale8[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, 64))


@needs_cc
def test_plain_c_block_linear_equals_the_avx2_one(tmp_path, monkeypatch) -> None:
    """The plain C loops (CPUs without AVX2) read the same tiles: built without AVX2, same products."""
    cc = kernels._compiler()
    assert cc is not None
    out = tmp_path / "plain.so"
    subprocess.run([*cc, "-O1", "-std=c11", "-fPIC", "-shared", "-mno-avx2", "-mno-fma", "-mno-f16c", "-o", str(out),
                    *map(str, kernels._SOURCES), "-lm"], check=True, capture_output=True)
    plain = kernels._bind(ctypes.CDLL(str(out)))
    g = torch.Generator().manual_seed(5)
    n, k = 21, 96  # a padded last tile
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(11, k, generator=g)  # a second pass over W for rows 9-11
    for bits, packed in ((4, kernels.pack_q4(*quantize_int4(w, 32))), (8, kernels.pack_q8(w))):
        fast = kernels.block_linear(x, packed, n, k, bits)
        monkeypatch.setattr(kernels, "_lib", plain)
        slow = kernels.block_linear(x, packed, n, k, bits)
        monkeypatch.undo()
        torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.skipif("avx512_vnni" not in kernels._cpu_flags().split(), reason="the CPU has no AVX-512 VNNI")
def test_avx512_vnni_block_linear_equals_the_avx2_one_bit_for_bit(tmp_path, monkeypatch) -> None:
    """The 512-bit integer dot products (vpdpbusd) compute the same integer sums as the AVX2 ones, so the
    outputs are equal bit for bit, 8-bit codes of -127 and 127 and a second pass over W included."""
    cc = kernels._compiler()
    assert cc is not None
    out = tmp_path / "avx2.so"
    subprocess.run([*cc, *kernels._FLAGS, "-mno-avx512f", "-o", str(out), *map(str, kernels._SOURCES), "-lm"],
                   check=True, capture_output=True)
    avx2 = kernels._bind(ctypes.CDLL(str(out)))
    g = torch.Generator().manual_seed(7)
    n, k = 45, 160  # a padded last tile, 5 blocks
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = torch.linspace(-1, 1, 32)  # one block of codes from -127 to 127
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(11, k, generator=g).to(dtype)
        for bits, packed in ((4, kernels.pack_q4(*quantize_int4(w, 32))), (8, kernels.pack_q8(w))):
            fast = kernels.block_linear(x, packed, n, k, bits)
            monkeypatch.setattr(kernels, "_lib", avx2)
            slow = kernels.block_linear(x, packed, n, k, bits)
            monkeypatch.undo()
            assert torch.equal(fast, slow), (dtype, bits)


@needs_cc
def test_block_linear_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="not a multiple of 32"):
        kernels.block_linear(torch.randn(1, 40), torch.zeros(1, 100, dtype=torch.uint8), 1, 40, 4)
    packed = kernels.pack_q8(torch.randn(16, 64))
    with pytest.raises(ValueError, match="do not hold a \\(24, 64\\) 8-bit matrix"):
        kernels.block_linear(torch.randn(1, 64), packed, 24, 64, 8)


@needs_cc
def test_kernels_keep_the_dtype_of_strided_inputs() -> None:
    """A decode row of a batched step is a column slice: not contiguous, still bfloat16 in and out."""
    q = torch.randn(9, 5, 64).bfloat16()[:, 2:3]
    k = torch.randn(3, 40, 64).bfloat16()
    assert not q.is_contiguous()
    assert kernels.decode_attention(q, [[(k, k)]], 0.125).dtype == torch.bfloat16
    x = torch.randn(4, 96).bfloat16()[:, :64]
    assert not x.is_contiguous()
    y = kernels.block_linear(x, kernels.pack_q8(torch.randn(16, 64)), 16, 64, 8)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 16)


@pytest.mark.parametrize(("env", "want"), [({}, "1000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "passive"}, None)])
def test_import_sets_a_short_spin_before_torch_loads_unless_the_user_chose(env: dict[str, str], want: str | None) -> None:
    """``import longkv`` sets GOMP_SPINCOUNT (read by the OpenMP runtime when torch loads) only where the environment
    names neither it nor OMP_WAIT_POLICY, and does not load torch itself."""
    import os
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import sys, os, longkv; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(want), "False"]


@needs_cc
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-3)])
def test_keys_seen_elsewhere_are_scored_with_the_query_turned(dtype: torch.dtype, tol: float) -> None:
    """Keys cached rotated at scattered positions and attended at consecutive ones (``SeenAt``): the kernel
    turns the query per run of one shift and reads the keys in place; against float64 attention over the keys
    rotated to where they are seen, it is as close as rotating the bfloat16 keys first (closer: one rounding less)."""
    torch.manual_seed(0)
    h, hkv, d, n = 9, 3, 64, 700
    rope = Rotary(d, AttnSpec(rope_theta=10000.0))
    q, raw, v = torch.randn(h, 1, d), torch.randn(hkv, n, d), torch.randn(hkv, n, d)
    cached = torch.randperm(3000)[:n].sort().values  # runs of one shift, of every length
    at = 3000 - n
    seen = at + torch.arange(n)
    scores = torch.einsum("hd,hnd->hn", q[:, 0].double(), rope.rotate(raw.double(), seen).repeat_interleave(h // hkv, 0)) * d**-0.5
    want = torch.einsum("hn,hnd->hd", torch.softmax(scores, -1), v.double().repeat_interleave(h // hkv, 0))
    k, vd = rope.rotate(raw.double(), cached).to(dtype), v.to(dtype)
    got = kernels.decode_attention(q.to(dtype), [[(SeenAt(k, cached, at, rope), vd)]], d**-0.5)[:, 0].double()
    rotated = kernels.decode_attention(q.to(dtype), [[(rope.rotate(k, seen - cached), vd)]], d**-0.5)[:, 0].double()
    err = (got - want).abs().max()
    assert err < tol and err <= (rotated - want).abs().max()
