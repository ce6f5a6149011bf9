"""CPU kernels of longkv's own, in C, built at first use with the machine's compiler.

PyTorch's operators are general; a decode step is a long row of tiny ones (one query per head, a few
thousand cached keys) where each costs more in dispatch and temporary buffers than in arithmetic.
The kernels here do one such job in one call, reading the KV pages in place:

* :func:`decode_attention`: one query per head for each sequence of a batch, over its cache's parts
  (bfloat16 or float32 pages, or int8 pages read as codes), one call for the batch;
* :func:`kv_write`, :func:`kv_write_coded`: a cache append (coded on the way in for int8/int4 pages);
* :func:`add_rms_norm`: the residual add and the next RMSNorm in one pass;
* :func:`rope`: the rotary embedding of the query and key heads, out of the projection's rows;
* :func:`block_linear`: a few rows times a matrix in 4-bit or 8-bit blocks laid out in tiles of 8
  output rows (:func:`pack_q4`, :func:`pack_q8`), the decode steps' projections;
* :func:`attn_in`, :func:`attn_out_mlp`: each half of a decoder layer (norm, projections, RoPE; output
  projection, norm, SwiGLU) for decode rows in one call;
* :class:`DecodeLayers`: a whole decode step through every layer in one call (both halves, the cache
  writes and decode attention of each layer), for batches whose every layer reads plain pages.

The library is compiled once per machine (``cc -O3 -march=native``, about a second) into
``$LONGKV_HOME/kernels/`` under a name that hashes the source, the compiler and the CPU's flags, and
loaded with ctypes (the call releases the GIL). Without a C compiler, or with ``LONGKV_KERNELS=0``,
:func:`available` is false and callers use their PyTorch path; the results agree to float32 rounding
(``tests/test_kernels.py``).
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from longkv.config import longkv_home

log = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = [_DIR / "cpu.c"]
_FLAGS = ["-O3", "-march=native", "-std=c11", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
          "-fassociative-math", "-fno-signed-zeros", "-fopenmp"]
MAX_GROUP, MAX_HEAD_DIM = 32, 512  # the C kernel's limits (query heads per KV head, head_dim)
_ACT_DTYPES = (torch.bfloat16, torch.float32)  # activations the kernels take

_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (split like a shell word list, e.g. ``ccache gcc``), else cc, gcc or clang."""
    env = os.environ.get("CC")
    if env:
        cmd = shlex.split(env)
        if cmd and shutil.which(cmd[0]):
            return cmd
        log.warning("CC=%s is not a command here: trying cc, gcc, clang", env)
    for cc in ("cc", "gcc", "clang"):
        if shutil.which(cc):
            return [cc]
    return None


def _build() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler (cc, gcc, clang) found: longkv's CPU kernels are off and decode runs on slower PyTorch ops "
                    "(install gcc; LONGKV_KERNELS=0 skips this check)")
        return None
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=False).stdout
    src = b"".join(p.read_bytes() for p in _SOURCES)
    key = hashlib.sha256(src + version.encode() + _cpu_flags().encode() + " ".join(_FLAGS).encode() + " ".join(cc).encode()).hexdigest()[:16]
    out = longkv_home() / "kernels" / f"longkv_kernels-{key}.so"
    failed = out.with_suffix(".failed")  # a build that failed once is not retried on every run
    if failed.exists():
        log.warning("longkv's CPU kernels are off: building them failed before (%s); decode runs on slower PyTorch ops. "
                    "Delete that file to retry, or set LONGKV_KERNELS=0", failed)
        return None
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # built aside, renamed into place: no half-written library
        os.close(fd)
        r = subprocess.run([*cc, *_FLAGS, "-o", tmp, *map(str, _SOURCES), "-lm"], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            os.unlink(tmp)
            why = (r.stderr or r.stdout).strip()[-2000:] or "(no output)"
            failed.write_text(f"{' '.join(cc)} exited with {r.returncode}:\n{why}\n")
            log.warning("building longkv's CPU kernels with %s failed (exit code %d), decode runs on slower PyTorch ops "
                        "(LONGKV_KERNELS=0 skips the build; details in %s): %s", " ".join(cc), r.returncode, failed, why.splitlines()[-1])
            return None
        os.chmod(tmp, 0o755)  # mkstemp made it private; the library is no secret
        os.replace(tmp, out)
    return _bind(ctypes.CDLL(str(out)))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the argument and result types of the kernels set."""
    f = lib.longkv_decode_attention
    p = ctypes.c_void_p
    f.argtypes = [p, p, ctypes.c_int, p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, p, ctypes.c_int]
    f.restype = ctypes.c_int
    f = lib.longkv_add_rms_norm
    f.argtypes = [p, p, p, p, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    f.restype = None
    f = lib.longkv_rope
    f.argtypes = [p, ctypes.c_int64, p, ctypes.c_int, ctypes.c_int, ctypes.c_int, p, p, ctypes.c_int, ctypes.c_int]
    f.restype = None
    f = lib.longkv_block_linear
    f.argtypes = [ctypes.c_int, p, ctypes.c_int64, ctypes.c_int, p, ctypes.c_int, p, ctypes.c_int]
    f.restype = ctypes.c_int
    i, fl = ctypes.c_int, ctypes.c_float
    f = lib.longkv_attn_in
    f.argtypes = [p, p, p, i, fl, i, i, i, p, p, i, i, i, p, p, i, p, p, i]
    f.restype = ctypes.c_int
    f = lib.longkv_attn_out_mlp
    f.argtypes = [p, p, i, i, p, p, i, fl, i, p, i, p, i, i, i, p, i]
    f.restype = ctypes.c_int
    f = lib.longkv_kv_write
    i64 = ctypes.c_int64
    f.argtypes = [p, p, i64, i64, p, p, i64, i64, p, i64, i64, p, i, i, i, i]
    f.restype = None
    f = lib.longkv_kv_write_coded
    f.argtypes = [p, p, p, p, p, p, i64, i64, i64, p, p, i64, i64, p, i64, i64, p, i, i, i, i, i, i]
    f.restype = ctypes.c_int
    f = lib.longkv_decode_layers
    f.argtypes = [i, p, fl, i, i, i, i, i, i, p, p, i, i, p, p, p, p, i, p, p, fl, p, p]
    f.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the C kernels are built and on (not with ``LONGKV_KERNELS=0``)."""
    global _lib, _tried
    if os.environ.get("LONGKV_KERNELS", "1") == "0":
        return False
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except OSError as e:  # an unwritable cache folder, a library that will not load
            log.warning("longkv's CPU kernels are off: %s", e)
            _lib = None
    return _lib is not None


_SEG_F32, _SEG_BF16, _SEG_INT8 = 0, 1, 8  # segment formats of the C kernel (cpu.c)
_NO_SIDES = (0,) * 7
_IN_PLACE = (0, 0)  # a segment's last two words: its keys are seen where they were cached


def _reads_codes(k: Any) -> bool:
    """Whether ``k`` is int8 pages read as codes (:class:`~longkv.kv.quant.CodedRows`, duck-typed: no import cycle)."""
    fmt = getattr(k, "fmt", None)
    return fmt is not None and getattr(fmt, "bits", 0) == 8 and k.planes["k"].device.type == "cpu"


def _seen_at_keys(k: Any) -> bool:
    """Whether ``k`` is keys seen at other positions (:class:`~longkv.kv.quant.SeenAt`, duck-typed)."""
    return isinstance(getattr(k, "cached", None), torch.Tensor) and hasattr(k, "rope")


def supports(q: torch.Tensor, k: Any) -> bool:
    """Whether :func:`decode_attention` takes queries like ``q`` (H, 1, D) over keys like ``k``: (Hkv, N, D)
    bfloat16 or float32 on the CPU, or int8 pages (:class:`~longkv.kv.quant.CodedRows`), either also seen
    at other positions (:class:`~longkv.kv.quant.SeenAt`)."""
    if _seen_at_keys(k):
        k = k.keys
    h, t, d = q.shape
    hkv = k.shape[0]
    kind = _reads_codes(k) or (isinstance(k, torch.Tensor) and k.device.type == "cpu" and k.dtype in (torch.bfloat16, torch.float32))
    return t == 1 and kind and d <= MAX_HEAD_DIM and hkv > 0 and h % hkv == 0 and h // hkv <= MAX_GROUP and available()


def segment(k: Any, v: Any) -> tuple[int, ...]:
    """The kernel's description of one part (see ``longkv_decode_attention``): format, pointers, strides; for
    :class:`~longkv.kv.quant.SeenAt` keys where they are seen."""
    if _seen_at_keys(k):
        return segment(k.keys, v)[: -len(_IN_PLACE)] + _seen_at(k.cached, 0, k.at)
    if _reads_codes(k):
        p = k.planes
        kc, vc, side = p["k"], p["v"], p["k_step"]
        if kc.stride(2) != 1 or side.stride(2) != 1 or any(p[n].stride() != side.stride() for n in ("k_min", "v_step", "v_min")):
            raise ValueError("decode_attention: int8 planes with contiguous rows, the four side planes alike")
        if vc.stride(1) != kc.stride(1):
            raise ValueError("decode_attention: int8 key and value planes with the same row stride")
        return coded_segment(p, 0, kc.shape[1], k.fmt.group)
    if not isinstance(k, torch.Tensor) or k.dtype not in (torch.bfloat16, torch.float32) or v.dtype != k.dtype:
        raise ValueError("decode_attention: parts of bfloat16 or float32 keys and values (or int8 pages)")
    ks, vs = k.stride(), v.stride()
    if ks[2] != 1 or vs[2] != 1:
        raise ValueError("decode_attention: parts with contiguous rows")
    fmt = _SEG_BF16 if k.dtype == torch.bfloat16 else _SEG_F32
    return (fmt, k.data_ptr(), v.data_ptr(), k.shape[1], ks[0], ks[1], vs[0], vs[1], *_NO_SIDES, *_IN_PLACE)


def decode_attention(q: torch.Tensor, plans: list[list[tuple[Any, Any]]], scale: float) -> torch.Tensor:
    """Attention of one query per head for each of B sequences, each over keys and values stored in its own
    parts, read in place; one call for the whole batch.

    Args:
        q: (H, B, D) rotated queries, column b for sequence b (any float dtype; the kernel computes in float32).
        plans: per sequence, its parts [(k, v)]: each (Hkv, N_i, D) bfloat16 or float32 on the CPU, rows
            contiguous (views of pool planes are fine), or int8 pages as codes (k and v the same
            :class:`~longkv.kv.quant.CodedRows`, decoded block by block inside the kernel); formats
            may differ between parts; empty parts are skipped. Keys as :class:`~longkv.kv.quant.SeenAt`
            are scored where they are seen: the query turned once per run of keys with one shift.
        scale: the softmax scale (``D ** -0.5``).

    Returns:
        (H, B, D) in q's dtype (zeros for a sequence with no keys).

    Raises:
        ValueError: shapes or dtypes the kernel does not take (check :func:`supports` first), or the
            kernels are off.
    """
    if _lib is None:  # (the caller asked supports(), which honours LONGKV_KERNELS=0)
        raise ValueError("longkv's CPU kernels are off (no C compiler, or LONGKV_KERNELS=0)")
    h, b, d = q.shape
    if len(plans) != b:
        raise ValueError(f"decode_attention: {b} query columns for {len(plans)} sequences")
    meta: list[int] = []
    nseg: list[int] = []
    hkv = 0
    inv_freq: torch.Tensor | None = None  # the RoPE keys seen elsewhere turn by (every part's the same model's)
    for parts in plans:
        count = 0
        for k, v in parts:
            if k.shape[1] == 0:
                continue
            if _seen_at_keys(k):
                inv_freq = k.rope.inv_freq
                assert inv_freq is not None and inv_freq.dtype == torch.float64 and inv_freq.is_contiguous()
            meta += segment(k, v)
            hkv = k.shape[0]
            count += 1
        nseg.append(count)
    if not meta:
        return torch.zeros_like(q)
    want = q.dtype
    if want not in _ACT_DTYPES:
        q = q.float()
    q = q.contiguous()
    out = torch.empty_like(q)
    flags = int(q.dtype == torch.bfloat16) << 1
    meta_a, nseg_a = array.array("q", meta), array.array("i", nseg)
    rc = _lib.longkv_decode_attention(meta_a.buffer_info()[0], nseg_a.buffer_info()[0], b, q.data_ptr(), out.data_ptr(), h, hkv, d,
                                      scale, flags, None if inv_freq is None else inv_freq.data_ptr(),
                                      0 if inv_freq is None else inv_freq.numel())
    if rc == -2:
        raise MemoryError("decode_attention: out of memory for the kernel's buffers")
    if rc != 0:
        raise ValueError(f"decode_attention: {h} query heads over {hkv} KV heads of size {d} are beyond the kernel's limits")
    return out if out.dtype == want else out.to(want)


def fused_ok(x: torch.Tensor) -> bool:
    """Whether :func:`add_rms_norm` and :func:`rope` take activations like ``x`` (CPU, bfloat16 or float32)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and available()


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += delta`` in place (skipped for None), then RMSNorm of x times ``weight``, in one pass.

    Args:
        x: (T, C) contiguous, bfloat16 or float32 (see :func:`fused_ok`); delta: the same shape and dtype.
        weight: (C,) of x's dtype, or float32 (kept exact under bfloat16 activations: Gemma's ``1 + w``).

    Returns:
        (T, C) new tensor: ``x / sqrt(mean(x^2) + eps) * weight`` computed in float32 and rounded once
        to x's dtype, as ``F.rms_norm`` does.
    """
    assert _lib is not None and x.is_contiguous() and weight.dtype in (x.dtype, torch.float32) and weight.is_contiguous()
    if delta is not None:
        assert delta.shape == x.shape and delta.dtype == x.dtype
        delta = delta.contiguous()
    out = torch.empty_like(x)
    t, c = x.shape
    _lib.longkv_add_rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                             t, c, eps, int(x.dtype == torch.bfloat16), int(weight.dtype == torch.bfloat16))
    return out


def kv_write(
    k_plane: torch.Tensor, v_plane: torch.Tensor, pos_plane: torch.Tensor, slot: int, k: torch.Tensor, v: torch.Tensor,
    positions: torch.Tensor,
) -> bool:
    """Write T tokens' keys, values and positions into a layer's page planes at ``slot`` in one call.

    Args:
        k_plane, v_plane: (Hkv, S, D) contiguous planes of a page pool (CPU); pos_plane: (S,) int64.
        k, v: (Hkv, T, D) of the planes' dtype with contiguous rows; positions: (T,) int64 contiguous.
        slot: the first slot written; slots ``[slot, slot + T)`` must be inside the planes.

    Returns:
        False (nothing written) where the kernel does not take these tensors (the caller copies
        with PyTorch), True once written.
    """
    if (
        _lib is None or k.dtype != k_plane.dtype or v.dtype != k_plane.dtype or k.stride(-1) != 1 or v.stride(-1) != 1
        or positions.dtype != torch.int64 or not positions.is_contiguous() or k.device.type != "cpu"
    ):  # fmt: skip
        return False
    hkv, t, d = k.shape
    assert slot + t <= k_plane.shape[1] and v_plane.stride() == k_plane.stride() and k_plane.is_contiguous()
    _lib.longkv_kv_write(k_plane.data_ptr(), v_plane.data_ptr(), k_plane.stride(0), slot, pos_plane.data_ptr(), k.data_ptr(),
                         k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1), positions.data_ptr(), hkv, t, d,
                         k.element_size())
    return True


def kv_write_coded(
    planes: dict[str, torch.Tensor], pos_plane: torch.Tensor, slot: int, k: torch.Tensor, v: torch.Tensor,
    positions: torch.Tensor, bits: int, group: int,
) -> bool:
    """Code T tokens' keys and values as int``bits`` and write them with their positions into a coded pool's planes
    at ``slot``, in one call: the codes, steps and minimums :func:`longkv.kv.quant.quantize` gives.

    Args:
        planes: the pool's planes (``longkv.kv.quant.CodedFormat.planes``): ``k``, ``v`` (Hkv, S, D * bits / 8)
            uint8 and ``k_step``, ``k_min``, ``v_step``, ``v_min`` (Hkv, S, D / group) float16, contiguous.
        pos_plane: (S,) int64. k, v: (Hkv, T, D) bfloat16 or float32 with contiguous rows; positions: (T,) int64.
        slot: the first slot written; ``[slot, slot + T)`` must be inside the planes.

    Returns:
        False (nothing written) where the kernel does not take these tensors (the caller codes with
        PyTorch), True once written.
    """
    if (
        _lib is None or k.dtype not in _ACT_DTYPES or v.dtype != k.dtype or k.stride(-1) != 1 or v.stride(-1) != 1
        or positions.dtype != torch.int64 or not positions.is_contiguous() or k.device.type != "cpu" or k.shape[-1] > MAX_HEAD_DIM
    ):  # fmt: skip
        return False
    hkv, t, d = k.shape
    kc, side = planes["k"], planes["k_step"]
    assert slot + t <= kc.shape[1] and kc.is_contiguous() and side.is_contiguous() and planes["v"].stride() == kc.stride()
    rc = _lib.longkv_kv_write_coded(
        kc.data_ptr(), planes["v"].data_ptr(), side.data_ptr(), planes["k_min"].data_ptr(), planes["v_step"].data_ptr(),
        planes["v_min"].data_ptr(), kc.stride(0), side.stride(0), slot, pos_plane.data_ptr(), k.data_ptr(), k.stride(0),
        k.stride(1), v.data_ptr(), v.stride(0), v.stride(1), positions.data_ptr(), hkv, t, d, group, bits,
        int(k.dtype == torch.bfloat16),
    )  # fmt: skip
    return rc == 0


def rope(rows: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE ("rotate halves") of the first ``heads`` heads of each row, written out head-major.

    Args:
        rows: (T, >= heads * head_dim) with contiguous rows (a slice of the q/k/v projection is fine),
            bfloat16 or float32; row t holds head h at columns ``[h * head_dim, (h + 1) * head_dim)``.
        cos, sin: (T, R/2) float32, R <= head_dim rotated channels (partial rotary passes the rest).

    Returns:
        (heads, T, head_dim) in rows' dtype, contiguous: what ``Rotary.apply`` gives for the heads.
    """
    assert _lib is not None and rows.stride(-1) == 1 and cos.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
    t = rows.shape[0]
    out = torch.empty(heads, t, head_dim, dtype=rows.dtype, device=rows.device)
    _lib.longkv_rope(rows.data_ptr(), rows.stride(0), out.data_ptr(), t, heads, head_dim, cos.data_ptr(), sin.data_ptr(),
                     2 * cos.shape[-1], int(rows.dtype == torch.bfloat16))
    return out


BLOCK = 32  # input channels per block of :func:`pack_q4` and :func:`pack_q8`
TILE_ROWS = 8  # output rows per tile
Q4_TILE, Q8_TILE = 160, 272  # bytes per tile of 8 rows x 32 inputs


def _tiles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes as (ceil(N / 8), K / 32, 8 chunks, 8 rows, 4 inputs): tile order, rows padded with zeros."""
    n, k = codes.shape
    pad = -n % TILE_ROWS
    if pad:
        codes = torch.cat((codes, codes.new_zeros(pad, k)))
    return codes.reshape(-1, TILE_ROWS, k // BLOCK, 8, 4).permute(0, 2, 3, 1, 4)


def _tile_halves(v: torch.Tensor) -> torch.Tensor:
    """(N, K / 32) per-block values as float16 bytes in tile order: (ceil(N / 8), K / 32, 16) uint8."""
    n, nb = v.shape
    pad = -n % TILE_ROWS
    h = torch.cat((v.float(), v.new_zeros(pad, nb).float())) if pad else v.float()
    return h.to(torch.float16).reshape(-1, TILE_ROWS, nb).transpose(1, 2).contiguous().view(torch.uint8)


def pack_q4(codes: torch.Tensor, step: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """4-bit tiles for :func:`block_linear` from codes: weight = code * step + lo per block of 32 inputs.

    Args:
        codes: (N, K) integer codes in [0, 15]; K a multiple of 32.
        step, lo: (N, K / 32) float, the blocks' step and minimum (stored as float16).

    Returns:
        (ceil(N / 8), K / 32 * 160) uint8: per tile of 8 output rows by 32 inputs, 128 bytes of codes
        (byte 32 c + 4 i + t: input 4 c + t of row i in the low nibble, input 4 (c + 4) + t in the high
        one, c < 4), then the 8 rows' steps and minimums as float16 (zero rows pad N to a multiple of 8).
    """
    t = _tiles(codes.to(torch.uint8))  # (G, K/32, 8 chunks, 8 rows, 4)
    nibbles = (t[:, :, :4] | (t[:, :, 4:] << 4)).reshape(t.shape[0], t.shape[1], 128)
    tiles = torch.cat((nibbles, _tile_halves(step), _tile_halves(lo)), dim=-1)  # (G, K/32, 160)
    return tiles.reshape(t.shape[0], -1).contiguous()


def pack_q8(w: torch.Tensor) -> torch.Tensor:
    """8-bit tiles for :func:`block_linear`: per block of 32 inputs, codes round(w / scale) with
    scale = max |w| / 127 (GGUF's Q8_0 arithmetic).

    Args:
        w: (N, K) float, K a multiple of 32.

    Returns:
        (ceil(N / 8), K / 32 * 272) uint8: per tile of 8 output rows by 32 inputs, 256 bytes of signed
        codes (byte 32 c + 4 i + t: input 4 c + t of row i), then the 8 rows' scales as float16.
    """
    n, k = w.shape
    wb = w.float().reshape(n, k // BLOCK, BLOCK)
    scale = (wb.abs().amax(-1) / 127).to(torch.float16)  # stored as float16: codes against that value
    codes = (wb / scale.float().clamp_min(1e-30)[..., None]).round_().clamp_(-127, 127).to(torch.int8).reshape(n, k)
    t = _tiles(codes.view(torch.uint8))
    tiles = torch.cat((t.reshape(t.shape[0], t.shape[1], 256), _tile_halves(scale)), dim=-1)  # (G, K/32, 272)
    return tiles.reshape(t.shape[0], -1).contiguous()


def block_linear(x: torch.Tensor, w: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """``x @ W.T`` for W (n, k) in the blocks of :func:`pack_q4` (``bits=4``) or :func:`pack_q8` (``bits=8``).

    x is coded to 8 bits per block of 32 inputs (scale max |x| / 127) and each block's dot product
    computed in integers, as llama.cpp does; the result is the exact product of the coded x with W.

    Args:
        x: (M, K) bfloat16 or float32 (each 8 rows are one pass over W).
        w: the packed tiles (uint8).

    Returns:
        (M, N) in x's dtype.

    Raises:
        ValueError: the library is not built, K is not a multiple of 32, or w's size is not that of
            a packed (n, k) matrix.
    """
    if _lib is None:
        raise ValueError("longkv's CPU kernels are off (no C compiler, or LONGKV_KERNELS=0)")
    if bits in (4, 8) and k % BLOCK == 0 and w.numel() != -(-n // TILE_ROWS) * (k // BLOCK) * (Q4_TILE if bits == 4 else Q8_TILE):
        raise ValueError(f"block_linear: {w.numel()} bytes of tiles do not hold a ({n}, {k}) {bits}-bit matrix: pack it with pack_q{bits}")
    want = x.dtype
    x = (x if x.dtype in (torch.bfloat16, torch.float32) else x.float()).contiguous()
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if _lib.longkv_block_linear(bits, w.data_ptr(), n, k, x.data_ptr(), m, y.data_ptr(), 3 * int(x.dtype == torch.bfloat16)) != 0:
        raise ValueError(f"block_linear: {k} input channels is not a multiple of {BLOCK} (or bits {bits} is not 4 or 8)")
    return y if y.dtype == want else y.to(want)


def _check_tiles(who: str, name: str, w: torch.Tensor, bits: int, n: int, k: int) -> None:
    if bits not in (4, 8) or k % BLOCK:
        raise ValueError(f"{who}: {name} needs 4 or 8 bits and inputs in multiples of {BLOCK} (got {bits} bits, {k} inputs)")
    if w.numel() != -(-n // TILE_ROWS) * (k // BLOCK) * (Q4_TILE if bits == 4 else Q8_TILE):
        raise ValueError(f"{who}: {name}'s {w.numel()} bytes of tiles do not hold a ({n}, {k}) {bits}-bit matrix")


class AttnIn:
    """The first half of a decoder layer for a few decode rows, bound to one layer's weights (checked once):
    a call adds ``delta`` to x in place (skipped for None), then RMSNorm, the fused q/k/v projection
    (:func:`block_linear`'s tiles, plus ``bias``) and RoPE of the query and key heads, in one kernel call
    with the rows kept in float32 in between.

    Args:
        norm_w: (C,) bfloat16 or float32; eps: the RMSNorm epsilon.
        qkv: tiles of the ((H + 2 Hkv) * D, C) matrix, ``bits`` 4 or 8; bias: ((H + 2 Hkv) * D,) or None.
        heads, kv_heads, head_dim: H, Hkv, D.

    Call with x (T, C) contiguous, bfloat16 or float32; delta of x's shape and dtype, or None; cos, sin
    (T, R/2) float32 contiguous (R rotated channels, as :func:`rope`). Returns qk (H + Hkv, T, D): the
    rotated query heads, then key heads; v (Hkv, T, D); in x's dtype.

    Raises:
        ValueError: the library is not built, or sizes or tiles the kernel does not take.
    """

    __slots__ = ("_args", "_keep", "head_dim", "heads", "kv_heads", "size")

    def __init__(
        self, norm_w: torch.Tensor, eps: float, qkv: torch.Tensor, bits: int, bias: torch.Tensor | None, heads: int,
        kv_heads: int, head_dim: int,
    ) -> None:
        if _lib is None:
            raise ValueError("longkv's CPU kernels are off (no C compiler, or LONGKV_KERNELS=0)")
        c = norm_w.shape[0]
        _check_tiles("attn_in", "qkv", qkv, bits, (heads + 2 * kv_heads) * head_dim, c)
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"attn_in: head_dim {head_dim} above {MAX_HEAD_DIM}")
        norm_w = norm_w.contiguous()
        bias = None if bias is None else bias.to(norm_w.dtype).contiguous()
        self._keep = (norm_w, qkv, bias)  # the kernel reads them through the pointers below
        self._args = (norm_w.data_ptr(), int(norm_w.dtype == torch.bfloat16), eps, c, bits, qkv.data_ptr(),
                      None if bias is None else bias.data_ptr(), heads, kv_heads, head_dim)  # fmt: skip
        self.heads, self.kv_heads, self.head_dim, self.size = heads, kv_heads, head_dim, c

    def __call__(
        self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        assert x.shape[1] == self.size and x.is_contiguous() and x.dtype in _ACT_DTYPES
        assert delta is None or (delta.dtype == x.dtype and delta.is_contiguous())
        qk = torch.empty(self.heads + self.kv_heads, t, self.head_dim, dtype=x.dtype)
        v = torch.empty(self.kv_heads, t, self.head_dim, dtype=x.dtype)
        norm, w_bf16, eps, c, bits, w, bias, h, hkv, d = self._args
        rc = _lib.longkv_attn_in(  # type: ignore[union-attr]
            x.data_ptr(), None if delta is None else delta.data_ptr(), norm, w_bf16, eps, t, c, bits, w, bias, h, hkv, d,
            cos.data_ptr(), sin.data_ptr(), 2 * cos.shape[-1], qk.data_ptr(), v.data_ptr(), int(x.dtype == torch.bfloat16),
        )  # fmt: skip
        if rc != 0:
            raise ValueError(f"attn_in: the kernel refused {2 * cos.shape[-1]} rotated channels of {d} (code {rc})")
        return qk, v


class AttnOutMlp:
    """The second half of a decoder layer for a few decode rows, bound to one layer's weights (checked once):
    a call adds ``o @ Wo.T`` to x in place, then RMSNorm, then SwiGLU (``down(silu(gate(h)) * up(h))``),
    in one kernel call with the rows kept in float32 in between.

    Args:
        o_w: tiles of the (C, Ho) output projection, ``o_bits`` 4 or 8; norm_w: (C,) bfloat16 or float32.
        gate_up: tiles of the (2 * inter, C) gate and up rows (gate first), ``bits_gu`` 4 or 8; down: tiles
            of the (C, inter) down projection, ``bits_dn`` 4 or 8; inter: the intermediate size; ho: Ho.

    Call with x (T, C) contiguous, bfloat16 or float32, and o (T, Ho) the attention output rows in x's
    dtype. Returns (T, C) in x's dtype: the MLP's output (the residual add is the next layer's).

    Raises:
        ValueError: the library is not built, or sizes or tiles the kernel does not take.
    """

    __slots__ = ("_args", "_keep", "size")

    def __init__(
        self, o_w: torch.Tensor, o_bits: int, ho: int, norm_w: torch.Tensor, eps: float, gate_up: torch.Tensor, bits_gu: int,
        down: torch.Tensor, bits_dn: int, inter: int,
    ) -> None:
        if _lib is None:
            raise ValueError("longkv's CPU kernels are off (no C compiler, or LONGKV_KERNELS=0)")
        c = norm_w.shape[0]
        for name, w, bits, n, k in (("o", o_w, o_bits, c, ho), ("gate_up", gate_up, bits_gu, 2 * inter, c), ("down", down, bits_dn, c, inter)):
            _check_tiles("attn_out_mlp", name, w, bits, n, k)
        norm_w = norm_w.contiguous()
        self._keep = (o_w, norm_w, gate_up, down)  # the kernel reads them through the pointers below
        self._args = (ho, o_bits, o_w.data_ptr(), norm_w.data_ptr(), int(norm_w.dtype == torch.bfloat16), eps, bits_gu,
                      gate_up.data_ptr(), bits_dn, down.data_ptr(), inter)  # fmt: skip
        self.size = c

    def __call__(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        assert x.shape[1] == self.size and x.is_contiguous() and x.dtype in _ACT_DTYPES and o.dtype == x.dtype and o.shape[1] == self._args[0]
        o = o.contiguous()
        out = torch.empty_like(x)
        rc = _lib.longkv_attn_out_mlp(  # type: ignore[union-attr]
            x.data_ptr(), o.data_ptr(), *self._args, t, self.size, out.data_ptr(), int(x.dtype == torch.bfloat16)
        )
        if rc != 0:
            raise ValueError(f"attn_out_mlp: the kernel refused these sizes (code {rc})")
        return out


KV_WORDS = 12  # per (layer, sequence) in DecodeLayers' kv (KVW in cpu.c)


def _seen_at(pos_plane: torch.Tensor | None, slot: int, at: int) -> tuple[int, int]:
    if pos_plane is None:
        return _IN_PLACE
    assert pos_plane.dtype == torch.int64 and pos_plane.is_contiguous()
    return pos_plane.data_ptr() + 8 * slot, at


def plain_segment(
    k_plane: torch.Tensor, v_plane: torch.Tensor, slot: int, n: int, pos_plane: torch.Tensor | None = None, at: int = 0
) -> tuple[int, ...]:
    """The decode attention kernel's description of ``n`` tokens at ``slot`` of a pool's (Hkv, S, D) contiguous
    bfloat16 or float32 planes: what :func:`decode_attention` makes of the views ``plane[:, slot:slot + n]``.
    With ``pos_plane`` (the pool's (S,) int64 original positions) attention sees the keys at positions
    ``at, at + 1, ...`` instead of where they were cached (RoPE turned by the difference, inside the kernel:
    :class:`DecodeLayers` with ``inv_freq``)."""
    d, es, hs = k_plane.shape[2], k_plane.element_size(), k_plane.stride(0)
    fmt = _SEG_BF16 if k_plane.dtype == torch.bfloat16 else _SEG_F32
    return (fmt, k_plane.data_ptr() + slot * d * es, v_plane.data_ptr() + slot * d * es, n, hs, d, hs, d, *_NO_SIDES,
            *_seen_at(pos_plane, slot, at))  # fmt: skip


def coded_segment(
    planes: dict[str, torch.Tensor], slot: int, n: int, group: int, pos_plane: torch.Tensor | None = None, at: int = 0
) -> tuple[int, ...]:
    """The decode attention kernel's description of ``n`` tokens at ``slot`` of int8 code planes
    (``longkv.kv.quant.CodedFormat``'s, a pool's or views of them, rows contiguous, the four side planes alike):
    what :func:`segment` makes of ``CodedRows`` over the slots ``[slot, slot + n)``; ``pos_plane``, ``at``: as
    :func:`plain_segment`'s."""
    kc, vc = planes["k"], planes["v"]
    side = planes["k_step"]
    cs, ss = kc.stride(1), side.stride(1)  # bytes of codes and float16 values per slot
    return (_SEG_INT8, kc.data_ptr() + slot * cs, vc.data_ptr() + slot * cs, n, kc.stride(0), cs, vc.stride(0), vc.stride(1),
            *(planes[name].data_ptr() + 2 * slot * ss for name in ("k_step", "k_min", "v_step", "v_min")), side.stride(0), ss,
            group, *_seen_at(pos_plane, slot, at))  # fmt: skip


def kv_words(planes: dict[str, torch.Tensor], pos_plane: torch.Tensor, slot: int, bits: int, group: int) -> tuple[int, ...]:
    """:class:`DecodeLayers`' :data:`KV_WORDS` for the new token's ``slot`` in a pool's planes: keys and values as
    computed (``bits=0``) or int8 codes (``bits=8``, coded on the way in, ``group`` values per step and minimum)."""
    k, v = planes["k"], planes["v"]
    head = (bits, k.data_ptr(), v.data_ptr(), pos_plane.data_ptr(), k.stride(0), slot)
    if not bits:
        return (*head, 0, 0, 0, 0, 0, 0)
    side = planes["k_step"]
    return (*head, *(planes[n].data_ptr() for n in ("k_step", "k_min", "v_step", "v_min")), side.stride(0), group)


class DecodeLayers:
    """A decode step of B sequences through every decoder layer in one kernel call: per layer the calls of
    :class:`AttnIn`, a cache append into each sequence's claimed slot, :func:`decode_attention` over each
    sequence's parts and :class:`AttnOutMlp`, in that order, so the result equals the layer-by-layer path
    bit for bit; no Python runs between the layers.

    Args:
        layers: per layer its bound halves (every layer the same heads, head_dim, sizes and RMSNorm epsilon).

    Call with x (B, C) the embeddings (contiguous, bfloat16 or float32; the residual stream afterwards),
    kv: :data:`KV_WORDS` ints per (layer, sequence), layer-major (:func:`kv_words`: where the new token's
    key, value and position go, planes of x's dtype or int8 codes); positions (B,) int64; cos, sin (B, R/2)
    float32 (one RoPE for every layer); meta: every layer's segments in turn (:func:`plain_segment`,
    :func:`coded_segment`, the claimed slots included); nseg: (L x B) segments per layer and sequence;
    inv_freq: the RoPE's (R/2,) float64 frequencies on the CPU, contiguous, where a segment's keys are seen at
    other positions than they were cached at (``pos_plane`` of :func:`plain_segment`); q_out: (L, B, H, D)
    contiguous in x's dtype, filled with every layer's rotated queries (for policies that keep them), or None.
    Returns (B, C): the last layer's MLP output (the final norm adds it to x).

    Raises:
        ValueError: layers that differ in shape, or the kernel refused the sizes.
    """

    __slots__ = ("_keep", "_lw", "dims", "eps", "layers")

    def __init__(self, layers: list[tuple[AttnIn, AttnOutMlp]]) -> None:
        if _lib is None or not layers:
            raise ValueError("DecodeLayers: the kernels are off, or no layers")
        first_in, first_out = layers[0]
        eps = first_in._args[2]
        h, hkv, d, c = first_in.heads, first_in.kv_heads, first_in.head_dim, first_in.size
        ho, inter = first_out._args[0], first_out._args[10]
        words: list[int] = []
        for a, b in layers:
            norm, w_bf16, e_in, _, bits, qkv, bias, *_ = a._args
            ho_b, o_bits, o, norm2, n2_bf16, e_out, bits_gu, gu, bits_dn, dn, inter_b = b._args
            if (a.heads, a.kv_heads, a.head_dim, a.size, b.size, ho_b, inter_b) != (h, hkv, d, c, c, ho, inter) or {e_in, e_out} != {eps}:
                raise ValueError("DecodeLayers: every layer needs the same heads, sizes and norm epsilon")
            words += [norm, w_bf16, bits, qkv, bias or 0, o_bits, o, norm2, n2_bf16, bits_gu, gu, bits_dn, dn]
        if ho != h * d:
            raise ValueError(f"DecodeLayers: an attention output of {ho} channels for {h} heads of {d}")
        self.layers = len(layers)
        self._keep = layers  # the kernel reads their weights through the pointers in _lw
        self._lw = (ctypes.c_int64 * len(words))(*words)
        self.eps = eps
        self.dims = (c, h, hkv, d, inter, ho)

    def __call__(
        self, x: torch.Tensor, kv: list[int], positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: list[int],
        nseg: list[int], inv_freq: torch.Tensor | None = None, q_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = x.shape[0]
        c, h, hkv, d, inter, ho = self.dims
        assert x.shape[1] == c and x.is_contiguous() and x.dtype in _ACT_DTYPES and positions.is_contiguous()
        assert len(kv) == KV_WORDS * self.layers * b and len(nseg) == self.layers * b and cos.dtype == torch.float32
        assert inv_freq is None or (inv_freq.dtype == torch.float64 and inv_freq.is_contiguous() and inv_freq.numel() == cos.shape[-1])
        assert q_out is None or (q_out.shape == (self.layers, b, h, d) and q_out.dtype == x.dtype and q_out.is_contiguous())
        out = torch.empty_like(x)
        # array.array copies a list of ints in C: ~5x faster than a ctypes array built from it (~60 us a step)
        kv_a, meta_a, nseg_a = array.array("q", kv), array.array("q", meta), array.array("i", nseg)
        rc = _lib.longkv_decode_layers(  # type: ignore[union-attr]
            self.layers, self._lw, self.eps, c, h, hkv, d, inter, ho, x.data_ptr(), out.data_ptr(), b, int(x.dtype == torch.bfloat16),
            kv_a.buffer_info()[0], positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), 2 * cos.shape[-1],
            meta_a.buffer_info()[0], nseg_a.buffer_info()[0], d**-0.5, None if inv_freq is None else inv_freq.data_ptr(),
            None if q_out is None else q_out.data_ptr(),
        )  # fmt: skip
        if rc == -2:
            raise MemoryError("decode_layers: out of memory for the kernel's buffers")
        if rc != 0:
            raise ValueError(f"decode_layers: the kernel refused these sizes (code {rc})")
        return out
