"""The random choices of MSN's views, drawn for a whole batch at once from a counter-based stream.

Every random number of every view of sample `key` comes from (seed, epoch, key) alone (`uniforms`), so a batch's
views do not depend on the batch, the number of workers or threads, or a resume. `view_params` turns them into
the per-view parameters of the augmentation (msn_spec.md section 6, torchvision's rules): crop box and flip,
colour jitter factors, grey, blur sigma. Used by the DALI graph (dali.py) and the batched tensor augmentation
(batched_views.py).
"""

from __future__ import annotations

import numpy as np

from .recipe import ViewRecipe

RATIO = (3 / 4, 4 / 3)
_NPARAM = 10  # per view: roi start, roi end, jitter?, brightness, contrast, colour?, hue, saturation, blur?, sigma


def _crop_boxes(u: np.ndarray, hw: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params, vectorised. u [..., 22] uniforms, hw [..., 2], scale [..., 2]
    -> (y0, x0, h, w) [..., 4]: 10 tries of area ~ U(scale)·H·W and log-uniform ratio, else a central crop."""
    h, w = hw[..., :1], hw[..., 1:2]
    target = h * w * (scale[..., :1] + (scale[..., 1:2] - scale[..., :1]) * u[..., :10])
    lr = np.log(RATIO)
    aspect = np.exp(lr[0] + (lr[1] - lr[0]) * u[..., 10:20])
    cw, ch = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.argmax(-1)[..., None]
    cw, ch, found = np.take_along_axis(cw, first, -1), np.take_along_axis(ch, first, -1), ok.any(-1, keepdims=True)
    r = w / h  # fallback: the whole image, clamped to the ratio range, centred
    fw = np.where(r < RATIO[0], w, np.where(r > RATIO[1], np.round(h * RATIO[1]), w))
    fh = np.where(r < RATIO[0], np.round(w / RATIO[0]), h)
    cw, ch = np.where(found, cw, fw), np.where(found, ch, fh)
    y0 = np.where(found, np.floor(u[..., 20:21] * (h - ch + 1)), (h - ch) // 2)
    x0 = np.where(found, np.floor(u[..., 21:22] * (w - cw + 1)), (w - cw) // 2)
    return np.concatenate([y0, x0, ch, cw], -1)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijective 64-bit hash; uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, keys, n: int) -> np.ndarray:
    """[len(keys), n] float64 uniforms in [0, 1): a counter-based SplitMix64 stream per (seed, epoch, key).

    Vectorised over the batch (~1 us per image; a numpy Generator per sample costs ~100 us of the main thread).
    """
    mask = (1 << 64) - 1
    base = _mix(np.array([seed & mask], np.uint64))
    base = _mix(base ^ np.array([epoch & mask], np.uint64))
    state = _mix(base ^ (np.asarray(keys, np.int64).astype(np.uint64)[:, None] + np.uint64(1)))
    ctr = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))[None, :]
    return (_mix(state + ctr) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def view_params(recipe: ViewRecipe, keys: list[int], hw: np.ndarray, seed: int, epoch: int) -> list[np.ndarray]:
    """All random choices of a batch: per view, _NPARAM arrays of shape [B] or [B, 2] (see _NPARAM).

    Sample b's numbers depend on (seed, epoch, keys[b]) only.
    """
    r, s = recipe, recipe.color_jitter
    nv = r.num_global + r.num_focal
    u = uniforms(seed, epoch, keys, nv * 31).reshape(len(keys), nv, 31)  # [B, V, 31]
    scale = np.array([r.global_scale] * r.num_global + [r.focal_scale] * r.num_focal, np.float64)
    box = _crop_boxes(u[..., :22], hw[:, None, :].astype(np.float64), np.broadcast_to(scale, u.shape[:2] + (2,)))
    y0, x0, ch, cw = np.moveaxis(box, -1, 0)
    flip = u[..., 22] < 0.5
    start = np.stack([y0, np.where(flip, x0 + cw, x0)], -1).astype(np.float32)
    end = np.stack([y0 + ch, np.where(flip, x0, x0 + cw)], -1).astype(np.float32)
    jit, grey, blur = u[..., 23] < 0.8, u[..., 28] < 0.2, u[..., 29] < r.blur_prob
    fac = 1 - 0.8 * s + 1.6 * s * u[..., 24:27]  # brightness, contrast, saturation factors ~ U(1 -+ 0.8 s)
    hue = np.where(jit, (u[..., 27] * 2 - 1) * 0.2 * s * 360, 0)  # torchvision hue fraction -> degrees
    sat = np.where(jit, fac[..., 2], 1) * ~grey
    sigma = 0.1 + 1.9 * u[..., 30]
    per_view = [start, end, jit, fac[..., 0], fac[..., 1], jit | grey, hue, sat, blur, sigma]
    per_view = [np.ascontiguousarray(np.moveaxis(p, 1, 0), np.bool_ if p.dtype == bool else np.float32)
                for p in per_view]  # [V, B, ...]
    return [[p[v] for p in per_view] for v in range(nv)]
