"""llama.cpp's K-quants (Q2_K ... Q6_K) and its per-tensor type mix, in numpy.

The ``gguf`` package writes only Q8_0 and the legacy 32-wide types; the K-quants exist only
in ggml's C code. This is a port of ggml's reference quantizers (``quantize_row_q{2..6}_K_ref``
in ``ggml/src/ggml-quants.c``, with ``make_qkx2_quants``, ``make_qx_quants``,
``make_q3_quants`` and ``nearest_int``), which is what ``llama-quantize`` runs when no
importance matrix is given, and of the type mix ``llama_tensor_get_type`` picks for each
preset (``src/llama-quant.cpp``), both as of llama.cpp 0c1e57098 (llama-cpp-python 0.3.36).

Why the code looks the way it does: to give the same bytes as ggml, every step is float32 as
in C, sums run in C's order (a reduction over axis 0 of a ``(n, blocks)`` array adds row after
row, unlike numpy's pairwise sum along the contiguous axis), and ``nearest_int`` is ggml's
bit trick (round half to even through the float32 mantissa). The per-element work is
vectorised across all (sub-)blocks of a tensor at once; only the fixed search steps loop.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK_K = 256
_F32 = np.float32
_GROUP_MAX_EPS = _F32(1e-15)

# lmforge's --quant name -> llama.cpp's ftype name (gguf.LlamaFileType member) and its default type
KQUANT_PRESETS: dict[str, tuple[str, str]] = {
    "q2_k": ("MOSTLY_Q2_K", "Q2_K"),
    "q3_k_s": ("MOSTLY_Q3_K_S", "Q3_K"),
    "q3_k_m": ("MOSTLY_Q3_K_M", "Q3_K"),
    "q3_k_l": ("MOSTLY_Q3_K_L", "Q3_K"),
    "q4_k_s": ("MOSTLY_Q4_K_S", "Q4_K"),
    "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K"),
    "q5_k_s": ("MOSTLY_Q5_K_S", "Q5_K"),
    "q5_k_m": ("MOSTLY_Q5_K_M", "Q5_K"),
    "q6_k": ("MOSTLY_Q6_K", "Q6_K"),
}
# llama.cpp's tensor_type_fallback: a 256-wide type on rows that do not divide into 256
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_BLOCK = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256,
          "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "F16": 1, "F32": 1}


def _nearest_int(value: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the low mantissa bits."""
    shifted = (value.astype(_F32, copy=False) + _F32(12582912.0)).view(np.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def _fp16(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the fp16 bytes' uint16 view, the value they hold back in float32)."""
    half = np.asarray(value, dtype=_F32).astype(np.float16)
    return half.view(np.uint16), half.astype(_F32)


def _seq_sum(values: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in C's loop order (row 0 + row 1 + ...), float32."""
    return np.add.reduce(values, axis=0, dtype=_F32)


def _make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` for every column of ``x`` (n, blocks): (scale, the_min, L).

    Levels stay float32 and are rounded with ``np.rint``: both round half to even, and here
    every value lies within [-1, nmax + 1], where ggml's bit trick is exactly that.
    """
    low = np.minimum(x.min(axis=0), _F32(0))
    high = x.max(axis=0)
    sum_w = _seq_sum(weights)
    sum_x = _seq_sum(weights * x)
    flat = high == low
    iscale = _F32(nmax) / np.where(flat, _F32(1), high - low)
    scale = _F32(1) / iscale
    top = _F32(nmax)
    shifted = np.empty_like(x)
    trial = np.empty_like(x)
    weighted = np.empty_like(x)
    work = np.empty_like(x)

    def levels_for(iscale: np.ndarray, low: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.subtract(x, low, out=shifted)
        np.multiply(iscale, shifted, out=out)
        np.rint(out, out=out)
        return np.clip(out, _F32(0), top, out=out)

    def error(step: np.ndarray, offset: np.ndarray, lv: np.ndarray) -> np.ndarray:
        np.multiply(step, lv, out=work)
        np.add(work, offset, out=work)
        np.subtract(work, x, out=work)
        if use_mad:
            np.abs(work, out=work)
        else:
            np.multiply(work, work, out=work)
        np.multiply(weights, work, out=work)
        return _seq_sum(work)

    # A masked copy of the (n, blocks) levels at every better step costs ~20 plain passes in numpy;
    # the levels are a pure function of (iscale, min), so keep those per column and round once.
    best_iscale, best_low = iscale, low
    best_error = error(scale, low, levels_for(iscale, low, trial))
    for step in range(nstep + 1):
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + top) / np.where(flat, _F32(1), high - low)
        levels_for(iscale, low, trial)
        np.multiply(weights, trial, out=weighted)
        sum_l = _seq_sum(weighted)
        np.multiply(weighted, trial, out=work)
        sum_l2 = _seq_sum(work)
        np.multiply(weighted, x, out=work)
        sum_xl = _seq_sum(work)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, _F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        cur_error = error(this_scale, this_min, trial)
        better = (det > 0) & (cur_error < best_error) & ~flat
        if better.any():
            best_iscale = np.where(better, iscale, best_iscale)
            best_low = np.where(better, low, best_low)  # the min these levels were rounded from
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    levels = levels_for(best_iscale, best_low, trial)
    scale = np.where(flat, _F32(0), scale)
    levels[:, flat] = 0
    return scale.astype(_F32), (-low).astype(_F32), levels.astype(np.int32)


def _signed_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max |x|, the x that has it, first one) per column, as ggml's loops find them."""
    first = np.abs(x).argmax(axis=0)
    signed = np.take_along_axis(x, first[None], axis=0)[0]
    return np.abs(signed), signed


def _make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` per column: (scale, L in 0..2*nmax-1); qw=NULL
    (``weights`` None) weighs each value by its square."""
    amax, signed = _signed_max(x)
    zero = amax < _GROUP_MAX_EPS
    safe = np.where(zero, _F32(1), signed)
    weights = x * x if weights is None else weights
    wx = weights * x
    work = np.empty_like(x)
    low, high = _F32(-nmax), _F32(nmax - 1)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # |iscale * x| <= nmax + 1 here, where np.rint is ggml's nearest_int (half to even)
        lv = np.multiply(iscale, x)
        np.rint(lv, out=lv)
        np.clip(lv, low, high, out=lv)
        np.multiply(wx, lv, out=work)
        sumlx = _seq_sum(work)
        np.multiply(weights, lv, out=work)
        np.multiply(work, lv, out=work)
        return lv, sumlx, _seq_sum(work)

    best_iscale = _F32(-nmax) / safe
    _, sumlx, suml2 = trial(best_iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F32(nmax) + _F32(0.1) * _F32(step)) / safe
        _, slx, sl2 = trial(iscale)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        # as in _make_qkx2_quants: keep the winning iscale per column, round the levels once
        best_iscale = np.where(better, iscale, best_iscale)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, slx / sl2, scale)
        best = np.where(better, scale * slx, best)
    levels = trial(best_iscale)[0]
    levels = np.where(zero, 0, levels.astype(np.int32) + nmax)
    return np.where(zero, _F32(0), scale).astype(_F32), levels


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` per column: (scale, L in 0..2*nmax-1)."""
    amax, signed = _signed_max(x)
    zero = amax < _GROUP_MAX_EPS
    iscale = _F32(-nmax) / np.where(zero, _F32(1), signed)
    levels = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1).astype(_F32)
    weights = x * x
    wx = weights * x
    sumlx = _seq_sum(wx * levels)
    suml2 = _seq_sum(weights * levels * levels)
    # ggml stops after a pass that changes nothing; further passes would change nothing either
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            for i in range(x.shape[0]):
                w, wxi, li = weights[i], wx[i], levels[i]
                slx = sumlx - wxi * li
                sl2 = suml2 - w * li * li
                new_l = np.clip(_nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1).astype(_F32)
                slx_new = slx + wxi * new_l
                sl2_new = sl2 + w * new_l * new_l
                accept = ((slx > 0) & (new_l != li) & (sl2_new > 0)
                          & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
                levels[i] = np.where(accept, new_l, li)
                sumlx = np.where(accept, slx_new, sumlx)
                suml2 = np.where(accept, sl2_new, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0)).astype(_F32)
    levels = np.where(zero, 0, levels.astype(np.int32) + nmax)
    return np.where(zero, _F32(0), scale), levels


def _columns(x: np.ndarray, width: int) -> np.ndarray:
    """(blocks, 256) -> (width, blocks * 256 / width): one sub-block per column, contiguous rows."""
    return np.ascontiguousarray(x.reshape(-1, width).T)


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """(blocks, 256) levels 0..3 -> qs (blocks, 64) as ggml packs q2_K/q3_K."""
    q = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _u16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<u2").view(np.uint8).reshape(-1, 2)


def _requant(x: np.ndarray, levels: np.ndarray, step: np.ndarray, offset: np.ndarray | None, lo: int, hi: int,
             shift: int) -> np.ndarray:
    """ggml's second pass: levels = clamp(nearest_int((x + offset) / step)) where step != 0, else kept."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = x if offset is None else x + offset[..., None]
        fresh = np.clip(_nearest_int(value / step[..., None]), lo, hi) + shift
    return np.where((step != 0)[..., None], fresh, levels)


def _block_max_and_inverse(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block (row): the largest sub-block scale (or min), at least 0, and ``top / max`` (0 where max is 0):
    what ggml's q2_K/q4_K/q5_K use to quantize their sub-block scales and mins to ``top``'s bits."""
    largest = np.maximum(values.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inverse = np.where(largest > 0, _F32(top) / largest, _F32(0)).astype(_F32)
    return largest, inverse


def _q4_q5_k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared by q4_K and q5_K: (header bytes d, dmin, scales[12]: (blocks, 16), levels (blocks, 8, 32))."""
    blocks = x.shape[0]
    cols = _columns(x, 32)
    av_x = np.sqrt(_seq_sum(cols * cols) / _F32(32))
    weights = av_x + np.abs(cols)
    scales, mins, levels = _make_qkx2_quants(cols, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(blocks, 8), mins.reshape(blocks, 8)
    levels = levels.T.reshape(blocks, 8, 32)
    max_scale, inv_scale = _block_max_and_inverse(scales, 63)
    max_min, inv_min = _block_max_and_inverse(mins, 63)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    packed = np.empty((blocks, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d_bits, d = _fp16(max_scale / _F32(63))
    dmin_bits, dmin = _fp16(max_min / _F32(63))
    step = d[:, None] * ls.astype(_F32)
    offset = dmin[:, None] * lm.astype(_F32)
    levels = _requant(x.reshape(blocks, 8, 32), levels, step, offset, 0, nmax, 0)
    header = np.concatenate([_u16_bytes(d_bits), _u16_bytes(dmin_bits), packed], axis=1)
    return header, levels


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_K_ref`` on (blocks, 256) float32 -> (blocks, 144) bytes."""
    header, levels = _q4_q5_k(x, 15, -1.0, 20)
    q = levels.reshape(-1, 4, 2, 32).astype(np.uint8)
    return np.concatenate([header, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q5_K_ref`` on (blocks, 256) float32 -> (blocks, 176) bytes."""
    header, levels = _q4_q5_k(x, 31, -0.5, 15)
    return np.concatenate([header, _pack_q5_k_levels(levels)], axis=1)


def _pack_q5_k_levels(levels: np.ndarray) -> np.ndarray:
    """(blocks, 8, 32) levels 0..31 -> qh (32 bytes) then ql (128 bytes), as ggml packs q5_K."""
    q = levels.reshape(-1, 4, 2, 32).astype(np.uint8)
    high = q >> 4
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for n in range(4):
        qh |= (high[:, n, 0] << (2 * n)) | (high[:, n, 1] << (2 * n + 1))
    ql = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    return np.concatenate([qh, ql], axis=1)


def _sixteen_sub_blocks(scales: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, ...]:
    """q3_K/q6_K's 16 sub-blocks of 16: the per-column scales and levels back in block order (scales (blocks, 16),
    levels (blocks, 16, 16)), and per block the largest |scale| and the signed scale that has it."""
    blocks = scales.shape[0] // 16
    scales = scales.reshape(blocks, 16)
    max_abs, max_scale = _signed_max(scales.T)
    return scales, levels.T.reshape(blocks, 16, 16), max_abs, max_scale


def _signed_scale_inverse(max_scale: np.ndarray, usable: np.ndarray, top: int) -> tuple[np.ndarray, ...]:
    """q3_K/q6_K's block scale: ``iscale = top / max_scale`` and ``d = fp16(1 / iscale)`` (bits and value) where
    the block is `usable`, 0 elsewhere (ggml zeroes those blocks or leaves d at 0)."""
    with np.errstate(divide="ignore"):
        iscale = np.where(usable, _F32(top) / np.where(usable, max_scale, _F32(1)), _F32(0)).astype(_F32)
        d_bits, d = _fp16(np.where(usable, _F32(1) / np.where(usable, iscale, _F32(1)), _F32(0)))
    return iscale, d_bits, d


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q6_K_ref`` on (blocks, 256) float32 -> (blocks, 210) bytes."""
    blocks = x.shape[0]
    scales, levels = _make_qx_quants(_columns(x, 16), 32)
    return _finish_q6_k(x, scales.reshape(blocks, 16), levels.T.reshape(blocks, 16, 16))


def _finish_q6_k(x: np.ndarray, scales: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The rest of ggml's q6_K from the 16 sub-block scales and levels: 8-bit scales, requantize, pack."""
    blocks = x.shape[0]
    max_abs, max_scale = _signed_max(scales.T)
    zero = max_abs < _GROUP_MAX_EPS
    iscale, d_bits, d = _signed_scale_inverse(max_scale, ~zero, -128)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127)
    sc = ((sc + 128) & 0xFF) - 128  # stored as int8_t
    step = d[:, None] * sc.astype(_F32)
    levels = _requant(x.reshape(blocks, 16, 16), levels, step, None, -32, 31, 32)
    q = levels.reshape(blocks, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(blocks, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(blocks, 64)
    out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _u16_bytes(d_bits)], axis=1)
    out[zero] = 0
    return out


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q3_K_ref`` on (blocks, 256) float32 -> (blocks, 110) bytes."""
    blocks = x.shape[0]
    scales, levels = _make_q3_quants(_columns(x, 16), 4)
    scales, levels, _, max_scale = _sixteen_sub_blocks(scales, levels)
    some = max_scale != 0
    iscale, d_bits, d = _signed_scale_inverse(max_scale, some, -32)
    l = ((_nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
    l = np.where(some[:, None], np.clip(l, -32, 31) + 32, 0).astype(np.uint8)
    packed = np.zeros((blocks, 12), np.uint8)
    packed[:, 0:8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    for j in range(16):
        packed[:, 8 + j % 4] |= (l[:, j] >> 4) << (2 * (j // 4))
    sc = np.where(some[:, None], l.astype(np.int32) - 32, -32)
    step = d[:, None] * sc.astype(_F32)
    levels = _requant(x.reshape(blocks, 16, 16), levels, step, None, -4, 3, 4).reshape(blocks, 256)
    return np.concatenate([*_pack_q3_k_levels(levels), packed, _u16_bytes(d_bits)], axis=1)


def _pack_q3_k_levels(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, 256) levels 0..7 -> (hmask (32 bytes), qs (64 bytes)), as ggml packs q3_K."""
    blocks = levels.shape[0]
    high = levels > 3
    levels = np.where(high, levels - 4, levels)
    hmask = np.zeros((blocks, 32), np.uint8)
    bits = high.reshape(blocks, 8, 32).astype(np.uint8)
    for k in range(8):
        hmask |= bits[:, k] << k
    return hmask, _pack_2bit(levels)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q2_K_ref`` on (blocks, 256) float32 -> (blocks, 84) bytes."""
    blocks = x.shape[0]
    cols = _columns(x, 16)
    scales, mins, levels = _make_qkx2_quants(cols, np.abs(cols), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(blocks, 16), mins.reshape(blocks, 16)
    levels = levels.T.reshape(blocks, 16, 16)
    max_scale, iscale = _block_max_and_inverse(scales, 15)
    max_min, imin = _block_max_and_inverse(mins, 15)
    low = np.where((max_scale > 0)[:, None], _nearest_int(iscale[:, None] * scales) & 0xFF, 0)
    high = np.where((max_min > 0)[:, None], (_nearest_int(imin[:, None] * mins) << 4) & 0xFF, 0)
    packed = (low | high).astype(np.uint8)
    d_bits, d = _fp16(np.where(max_scale > 0, max_scale / _F32(15), _F32(0)))
    dmin_bits, dmin = _fp16(np.where(max_min > 0, max_min / _F32(15), _F32(0)))
    step = d[:, None] * (packed & 0xF).astype(_F32)
    offset = dmin[:, None] * (packed >> 4).astype(_F32)
    levels = _requant(x.reshape(blocks, 16, 16), levels, step, offset, 0, 3, 0)
    return np.concatenate([packed, _pack_2bit(levels.reshape(blocks, 256)), _u16_bytes(d_bits),
                           _u16_bytes(dmin_bits)], axis=1)


# --- with an importance matrix: ggml's quantize_row_*_impl (what llama-quantize --imatrix runs) ---------


def _make_qp_quants(x: np.ndarray, nmax: int, quant_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)`` per column of non-negative ``x`` (n, blocks):
    (scale, L in 0..nmax), as ggml quantizes the sub-block scales and mins of a super-block."""
    n = x.shape[0]
    top = x.max(axis=0)
    zero = top < _GROUP_MAX_EPS
    safe = np.where(zero, _F32(1), top)
    iscale = _F32(nmax) / safe
    levels = _nearest_int(iscale * x)
    scale = _F32(1) / iscale
    diff = x - scale * levels.astype(_F32)
    best_mse = _seq_sum(quant_weights * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (_F32(0.1) * _F32(step) + _F32(nmax)) / safe
        scale_is = _F32(1) / iscale_is
        lv = np.minimum(_nearest_int(iscale_is * x), nmax)
        diff = x - scale_is * lv.astype(_F32)
        mse = _seq_sum(quant_weights * diff * diff)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, iscale_is, iscale)
    levels = np.minimum(_nearest_int(iscale * x), nmax).astype(_F32)
    wx = quant_weights * x
    sumlx = _seq_sum(wx * levels)
    suml2 = _seq_sum(quant_weights * levels * levels)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = np.zeros(x.shape[1], bool)
            for i in range(n):
                w, li = quant_weights[i], levels[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - w * li * li
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(_nearest_int(x[i] * sl2 / np.where(ok, slx, _F32(1))), nmax).astype(_F32)
                slx_new = slx + wx[i] * new_l
                sl2_new = sl2 + w * new_l * new_l
                accept = ok & (new_l != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                levels[i] = np.where(accept, new_l, li)
                sumlx = np.where(accept, slx_new, sumlx)
                suml2 = np.where(accept, sl2_new, suml2)
                changed |= accept
            if not changed.any():  # ggml stops a block after a pass that changes nothing
                break
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0)).astype(_F32)
    levels = np.where(zero, 0, levels.astype(np.int32))
    return np.where(zero, _F32(0), scale), levels


def _importance(x: np.ndarray, quant_weights: np.ndarray, sigma2: np.ndarray, width: int) -> np.ndarray:
    """``qw[l] * sqrtf(sigma2 + x[l]*x[l])`` as columns of ``width`` (one sub-block each), float32."""
    rows = x.reshape(x.shape[0], -1, width)
    weights = quant_weights.reshape(x.shape[0], -1, width) * np.sqrt(sigma2[:, None, None] + rows * rows)
    return _columns(weights.reshape(x.shape[0], -1), width)


def _superblock_sigma2(x: np.ndarray, factor: float) -> np.ndarray:
    """``factor * sum(x*x) / 256`` per super-block (row of ``x``), summed in C's order."""
    return _F32(factor) * _seq_sum(np.ascontiguousarray((x * x).T)) / _F32(QK_K)


def _q4_q5_k_weighted(x: np.ndarray, quant_weights: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q4_K_impl`` / ``q5_K_impl`` with quant_weights: (header bytes, levels (blocks, 8, 32))."""
    blocks = x.shape[0]
    cols = _columns(x, 32)
    weights = _importance(x, quant_weights, _superblock_sigma2(x, 2), 32)
    sw = _seq_sum(weights).reshape(blocks, 8)
    scales, mins, levels = _make_qkx2_quants(cols, weights, nmax, -0.9, 0.05, 36, False)
    scales, mins = scales.reshape(blocks, 8), mins.reshape(blocks, 8)
    levels = levels.T.reshape(blocks, 8, 32)
    d_block, ls = _make_qp_quants(np.ascontiguousarray(scales.T), 63, np.ascontiguousarray(sw.T))
    m_block, lm = _make_qp_quants(np.ascontiguousarray(mins.T), 63, np.ascontiguousarray(sw.T))
    ls, lm = np.minimum(ls.T, 63).astype(np.uint8), np.minimum(lm.T, 63).astype(np.uint8)
    packed = np.empty((blocks, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d_bits, d = _fp16(d_block)
    dmin_bits, dmin = _fp16(m_block)
    step = d[:, None] * ls.astype(_F32)
    offset = dmin[:, None] * lm.astype(_F32)
    levels = _requant(x.reshape(blocks, 8, 32), levels, step, offset, 0, nmax, 0)
    header = np.concatenate([_u16_bytes(d_bits), _u16_bytes(dmin_bits), packed], axis=1)
    return header, levels


def quantize_q4_k_weighted(x: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    header, levels = _q4_q5_k_weighted(x, quant_weights, 15)
    q = levels.reshape(-1, 4, 2, 32).astype(np.uint8)
    return np.concatenate([header, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def quantize_q5_k_weighted(x: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    header, levels = _q4_q5_k_weighted(x, quant_weights, 31)
    return np.concatenate([header, _pack_q5_k_levels(levels)], axis=1)


def quantize_q6_k_weighted(x: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    blocks = x.shape[0]
    qw = np.ascontiguousarray(np.broadcast_to(quant_weights, x.shape))
    scales, levels = _make_qx_quants(_columns(x, 16), 32, _columns(qw, 16))
    return _finish_q6_k(x, scales.reshape(blocks, 16), levels.T.reshape(blocks, 16, 16))


def quantize_q3_k_weighted(x: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    blocks = x.shape[0]
    weights = _importance(x, quant_weights, _superblock_sigma2(x, 2), 16)
    sw = _seq_sum(weights).reshape(blocks, 16)
    scales, levels = _make_qx_quants(_columns(x, 16), 4, weights)
    scales = scales.reshape(blocks, 16)
    levels = levels.T.reshape(blocks, 16, 16)
    d_block, ls = _make_qx_quants(np.ascontiguousarray(scales.T), 32, np.ascontiguousarray(sw.T))
    l = ls.T.astype(np.uint8)  # 0..63, the stored 6-bit scales
    packed = np.zeros((blocks, 12), np.uint8)
    packed[:, 0:8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    for j in range(16):
        packed[:, 8 + j % 4] |= (l[:, j] >> 4) << (2 * (j // 4))
    d_bits, d = _fp16(d_block)
    step = d[:, None] * (l.astype(np.int32) - 32).astype(_F32)
    levels = _requant(x.reshape(blocks, 16, 16), levels, step, None, -4, 3, 4).reshape(blocks, 256)
    return np.concatenate([*_pack_q3_k_levels(levels), packed, _u16_bytes(d_bits)], axis=1)


def quantize_q2_k_weighted(x: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    blocks = x.shape[0]
    weights = _importance(x, quant_weights, _superblock_sigma2(x, 1), 16)
    sw = _seq_sum(weights).reshape(blocks, 16)
    scales, mins, levels = _make_qkx2_quants(_columns(x, 16), weights, 3, -0.9, 0.05, 36, False)
    scales, mins = scales.reshape(blocks, 16), mins.reshape(blocks, 16)
    levels = levels.T.reshape(blocks, 16, 16)
    dm, ls = _make_qp_quants(np.ascontiguousarray(scales.T), 15, np.ascontiguousarray(sw.T))
    mm, lm = _make_qp_quants(np.ascontiguousarray(mins.T), 15, np.ascontiguousarray(sw.T))
    packed = (ls.T | (lm.T << 4)).astype(np.uint8)
    d_bits, d = _fp16(dm)
    dmin_bits, dmin = _fp16(mm)
    step = d[:, None] * (packed & 0xF).astype(_F32)
    offset = dmin[:, None] * (packed >> 4).astype(_F32)
    levels = _requant(x.reshape(blocks, 16, 16), levels, step, offset, 0, 3, 0)
    return np.concatenate([packed, _pack_2bit(levels.reshape(blocks, 256)), _u16_bytes(d_bits),
                           _u16_bytes(dmin_bits)], axis=1)


def _row_sigma2(data: np.ndarray) -> np.ndarray:
    """``sum(x*x) / n_per_row`` per row, summed in C's order (the legacy types' *_impl)."""
    return _seq_sum(np.ascontiguousarray((data * data).T)) / _F32(data.shape[1])


def _pack_nibbles(levels: np.ndarray) -> np.ndarray:
    """(blocks, 32) levels -> 16 bytes: L[j] | L[j + 16] << 4 (low four bits)."""
    q = levels.astype(np.uint8)
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _high_bits(levels: np.ndarray) -> np.ndarray:
    """(blocks, 32) 5-bit levels -> the 4 little-endian bytes of their fifth bits (qh)."""
    bits = (levels.astype(np.uint32) >> 4) & 1
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def quantize_legacy_weighted(data: np.ndarray, kind: str, quant_weights: np.ndarray) -> np.ndarray:
    """``quantize_q4_0/q4_1/q5_0/q5_1`` with quant_weights (``quantize_row_*_impl``): uint8 (rows, bytes)."""
    rows, n_per_row = data.shape
    x = np.ascontiguousarray(data, dtype=_F32)
    sigma2 = np.repeat(_row_sigma2(x), n_per_row // 32)
    blocks = x.reshape(-1, 32)
    qw = np.ascontiguousarray(np.broadcast_to(quant_weights.reshape(-1, 32), (rows, n_per_row // 32, 32))).reshape(-1, 32)
    weights = np.ascontiguousarray((qw * np.sqrt(sigma2[:, None] + blocks * blocks)).T)
    cols = np.ascontiguousarray(blocks.T)
    if kind in ("Q4_0", "Q5_0"):
        nmax = 8 if kind == "Q4_0" else 16
        d, levels = _make_qx_quants(cols, nmax, weights)
        parts = [_u16_bytes(_fp16(d)[0])]
    else:
        nmax = 15 if kind == "Q4_1" else 31
        d, the_min, levels = _make_qkx2_quants(cols, weights, nmax, -0.9, 0.05, 36, False)
        parts = [_u16_bytes(_fp16(d)[0]), _u16_bytes(_fp16(-the_min)[0])]
    levels = levels.T
    if kind in ("Q5_0", "Q5_1"):
        parts.append(_high_bits(levels))
    parts.append(_pack_nibbles(levels))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


_WEIGHTED = {"Q2_K": quantize_q2_k_weighted, "Q3_K": quantize_q3_k_weighted, "Q4_K": quantize_q4_k_weighted,
             "Q5_K": quantize_q5_k_weighted, "Q6_K": quantize_q6_k_weighted}


_QUANTIZERS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k,
               "Q6_K": quantize_q6_k}
# Sub-blocks per numpy call: large enough to amortise the loops, small enough to stay in cache.
_CHUNK_BLOCKS = 256
_THREADS = min(4, os.cpu_count() or 1)


def quantize_k(data: np.ndarray, ggml_type: str, quant_weights: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float matrix (rows divisible by 256) to ``ggml_type``: uint8 (rows, bytes per row).

    ``quant_weights``: the importance of each column (an imatrix entry, one value per column), used
    as ggml's ``quantize_*`` use it (``quantize_row_*_impl``); without it, ``quantize_row_*_ref``.
    """
    rows, cols = data.shape
    if cols % QK_K:
        raise ValueError(f"{ggml_type} needs rows that divide into {QK_K}, not {cols}")
    blocks = np.ascontiguousarray(data, dtype=_F32).reshape(-1, QK_K)
    quantizer = _QUANTIZERS[ggml_type]
    if quant_weights is not None:
        # every row's super-blocks take the same slices of the column weights
        per_block = np.ascontiguousarray(quant_weights, dtype=_F32).reshape(-1, QK_K)
        weighted = _WEIGHTED[ggml_type]
        per_row = cols // QK_K

        def quantizer(chunk_and_start: tuple[np.ndarray, int]) -> np.ndarray:  # type: ignore[no-redef]
            chunk, start = chunk_and_start
            index = (np.arange(start, start + len(chunk)) % per_row)
            return weighted(chunk, per_block[index])

    starts = range(0, len(blocks), _CHUNK_BLOCKS)
    chunks = [blocks[i:i + _CHUNK_BLOCKS] for i in starts]
    if quant_weights is not None:
        chunks = list(zip(chunks, starts))
    # Chunks are independent and numpy releases the GIL inside each array operation, so threads
    # use the other cores (llama-quantize runs its quantizer on several threads too); bytes are
    # the same in any order, as each chunk is concatenated in place.
    workers = min(len(chunks), _THREADS)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(quantizer, chunks))
    else:
        parts = [quantizer(chunk) for chunk in chunks]
    return np.concatenate(parts).reshape(rows, -1)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_types(preset: str, tensors: list[tuple[str, tuple[int, ...]]], n_layers: int, n_gqa: int) -> dict[str, str]:
    """llama.cpp's ``llama_tensor_get_type`` for a Llama model: GGUF tensor name -> GGML type name.

    ``tensors``: (GGUF name, numpy shape) in file order, as llama.cpp counts attn_v and
    ffn_down tensors in that order. 1-D tensors and norms stay F32 (not listed).
    """
    default = KQUANT_PRESETS[preset][1]
    tied = not any(name == "output.weight" for name, _ in tensors)
    n_attn_v = sum("attn_v.weight" in name for name, _ in tensors)
    i_attn_v = i_ffn_down = 0
    chosen: dict[str, str] = {}
    for name, shape in tensors:
        if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight"):
            continue
        ncols = shape[-1]
        kind = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            kind = "Q8_0" if ncols % _BLOCK[kind] else "Q6_K"
        elif "attn_v.weight" in name:
            if preset == "q2_k":
                kind = "Q4_K" if n_gqa >= 4 else "Q3_K"
            elif preset == "q3_k_m":
                kind = "Q5_K" if i_attn_v < 2 else "Q4_K"
            elif preset == "q3_k_l":
                kind = "Q5_K"
            elif preset in ("q4_k_m", "q5_k_m") and _use_more_bits(i_attn_v, n_attn_v):
                kind = "Q6_K"
            elif preset == "q4_k_s" and i_attn_v < 4:
                kind = "Q5_K"
            i_attn_v += 1
        elif "ffn_down" in name:
            i = i_ffn_down
            if preset == "q2_k":
                kind = "Q3_K"
            elif preset == "q3_k_m":
                kind = "Q5_K" if i < n_layers // 16 else "Q4_K"
            elif preset == "q3_k_l":
                kind = "Q5_K"
            elif preset == "q4_k_m":
                if _use_more_bits(i, n_layers):
                    kind = "Q6_K"
            elif preset == "q5_k_m" and _use_more_bits(i, n_layers):
                kind = "Q6_K"
            elif preset == "q4_k_s" and i < n_layers // 8:
                kind = "Q5_K"
            i_ffn_down += 1
        elif "attn_output.weight" in name:
            kind = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(preset, kind)
        if ncols % _BLOCK[kind]:
            kind = _FALLBACK.get(kind, kind)
            if ncols % _BLOCK[kind]:
                kind = "F16"
        chosen[name] = kind
    return chosen
