"""Sampling a scene larger than the model's window: overlapping windows, one noise field.

The model sees ``window_size`` pixels at a time. A scene is covered by windows that overlap
by half; every window starts from its crop of one noise field drawn for the whole scene,
and at every sampling step the windows' x0 predictions are blended (a smooth weight that
falls towards each window's border) before the sampler moves the whole field to the next
noise level. Neighbouring windows therefore agree where they overlap and no seam appears
(MetaEarth's idea). One-token modalities (location, time, labels) are one value per scene:
their per-window predictions are averaged.

``num_samples`` samples of a scene are drawn together: (sample, window) pairs run through
the model in batches.

Raster noise comes from :class:`NoiseField`: generated per 64 px block from the seed and the
block's position, so any crop of the field is reproducible on its own and the result does
not depend on how windows are batched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from terrasynth.devices import model_device, to_device
from terrasynth.errors import TerrasynthError
from terrasynth.models.base import GenerativeModel
from terrasynth.models.signals import Signal
from terrasynth.sampling.conditional import (
    Generated,
    guide,
    keep_given,
    predict,
    sampling_inputs,
    x0_from_prediction,
)
from terrasynth.sampling.flow import FlowSampler


class NoiseField:
    """Standard-normal noise over an unbounded pixel grid, made lazily per block.

    Block (i, j) of ``stream`` is drawn from a generator seeded by a hash of (seed, stream,
    i, j), so a crop needs only the blocks it touches and is the same crop however large
    the scene or whatever the order of requests."""

    BLOCK = 64

    def __init__(self, seed: int, stream: str, channels: int) -> None:
        self.seed, self.stream, self.channels = seed, stream, channels

    def _block(self, i: int, j: int) -> torch.Tensor:
        key = f"{self.seed}/{self.stream}/{i}/{j}".encode()
        block_seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        g = torch.Generator().manual_seed(block_seed & (2**63 - 1))
        return torch.randn((self.channels, self.BLOCK, self.BLOCK), generator=g)

    def crop(self, row: int, col: int, height: int, width: int) -> torch.Tensor:
        """(channels, height, width) noise starting at pixel (row, col)."""
        b = self.BLOCK
        out = torch.empty((self.channels, height, width))
        for i in range(row // b, (row + height - 1) // b + 1):
            for j in range(col // b, (col + width - 1) // b + 1):
                r0, r1 = max(row, i * b), min(row + height, (i + 1) * b)
                c0, c1 = max(col, j * b), min(col + width, (j + 1) * b)
                out[:, r0 - row : r1 - row, c0 - col : c1 - col] = self._block(i, j)[
                    :, r0 - i * b : r1 - i * b, c0 - j * b : c1 - j * b
                ]
        return out


def _field(seed: int, target: str, group: str, like: torch.Tensor, n: int) -> torch.Tensor:
    """(n, C, h, w) start noise for n samples of a (1, C, h, w) group, from lazy fields."""
    c, h, w = like.shape[1:]
    return torch.stack([start_noise(seed, target, group, s, c).crop(0, 0, h, w) for s in range(n)])


def window_offsets(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` px covering ``size`` px (last one flush)."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blend_weight(window: int) -> torch.Tensor:
    """(window, window) weights: 1 in the middle, falling smoothly to a small value at the
    border, so a pixel is decided mostly by the windows that see it with context."""
    ramp = torch.sin(torch.pi * (torch.arange(window) + 0.5) / window) ** 2
    w = ramp[:, None] * ramp[None, :]
    return w.clamp_min(1e-3)


def _crop(x: torch.Tensor, r: int, c: int, size: int, factor: int) -> torch.Tensor:
    return x[..., r // factor : (r + size) // factor, c // factor : (c + size) // factor]


def _window_signals(
    scene: dict[str, Signal], windows: list[tuple[int, int]], size: int, factors: dict
) -> dict[str, Signal]:
    """Signals of a batch of windows cut from one-scene signals (batch dimension 1)."""
    out = {}
    n = len(windows)
    for name, sig in scene.items():
        present = sig.present.expand(n)
        if sig.groups is None:
            out[name] = Signal(
                present, vector=sig.vector.expand(n, -1), known=sig.known.expand(n, -1)
            )
            continue

        def cut(d: dict[str, torch.Tensor], name: str = name) -> dict[str, torch.Tensor]:
            return {
                g: torch.cat([_crop(v, r, c, size, factors[name][g]) for r, c in windows])
                for g, v in d.items()
            }

        out[name] = Signal(
            present,
            groups=cut(sig.groups),
            known=cut(sig.known),
            target=cut(sig.target) if sig.target is not None else None,
        )
    return out


def _layout(model: GenerativeModel, scene: dict[str, Signal]) -> tuple[dict, list[tuple[int, int]]]:
    """Band-group factors of the scene's rasters and the (row, col) offsets of its windows
    on the base grid (the model's stride, at least the coarsest factor)."""
    size = model.config.window_size
    reg = model.config.registry
    factors = {n: {g.name: g.factor for g in reg[n].groups} for n, s in scene.items() if s.groups}
    first = next(n for n, s in scene.items() if s.groups is not None)
    g0, x = next(iter(scene[first].groups.items()))
    height, width = (d * factors[first][g0] for d in x.shape[-2:])
    stride = max(model.config.stride, max(max(f.values()) for f in factors.values()))
    rows, cols = window_offsets(height, size, stride), window_offsets(width, size, stride)
    return factors, [(r, c) for r in rows for c in cols]


@torch.no_grad()
def blend_x0(
    model: GenerativeModel,
    scene: dict[str, Signal],
    targets: list[str],
    x: dict,
    windows: list[tuple[int, int]],
    t: float,
    gsd: float,
    factors: dict,
    guidance: float = 1.0,
    given_bands: dict | None = None,
    batch_size: int = 32,
    with_probs: bool = False,
    on_call: Callable[[], None] | None = None,
) -> tuple[dict, dict, dict]:
    """One sampling step's blended x0 over the grid of ``scene``.

    ``x``: the targets' noisy state on that grid, one row per sample; ``windows``: the
    (row, col) windows to run for every sample, about ``batch_size`` (sample, window)
    pairs per model call. Returns the weighted sums of the windows' x0 predictions, their
    weights, and (``with_probs``) the weighted class probabilities of categorical targets;
    sum / weight is the blend.
    """
    size = model.config.window_size
    weight = blend_weight(size)
    weights = {f: _crop_weight(weight, f) for d in factors.values() for f in d.values()}
    acc, norm = _zeros_like_state(x), _zeros_like_state(x, weights_only=True)
    probs_acc: dict[str, dict[str, torch.Tensor]] = {}
    items, repeats, batch_size = _call_plan(model, windows, _num_samples(x), batch_size)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        wins = [w for _, w in chunk]
        sigs = _window_signals(scene, wins, size, factors)
        xs = _window_state(x, chunk, size, factors)
        gsd_b = torch.full((len(chunk),), float(gsd))
        given = _expand_given(given_bands, len(chunk))
        pred = predict(model, sigs, targets, xs, t, gsd_b, given, True, repeats)
        if on_call is not None:
            on_call()
        if guidance != 1.0:
            unc = predict(model, sigs, targets, xs, t, gsd_b, given, False, repeats)
            pred = {n: guide(pred[n], unc[n], guidance) for n in targets}
            if on_call is not None:
                on_call()
        for n in targets:
            x0, payload = x0_from_prediction(sigs[n], pred[n])
            x0 = keep_given(x0, sigs[n], (given or {}).get(n))
            if not isinstance(x0, dict):
                for k, (s, _) in enumerate(chunk):
                    acc[n][s] += x0[k]
                    norm[n][s] += 1.0
                continue
            for g, v in x0.items():
                f = factors[n][g]
                wgt = weights[f]
                for k, (s, (r, c)) in enumerate(chunk):
                    _crop(acc[n][g][s], r, c, size, f).add_(v[k] * wgt)
                    _crop(norm[n][g][s], r, c, size, f).add_(wgt)
                    if payload is not None and with_probs:
                        pa = probs_acc.setdefault(n, {}).setdefault(g, torch.zeros_like(acc[n][g]))
                        _crop(pa[s], r, c, size, f).add_(payload[g][k] * wgt)
    return acc, norm, probs_acc


def _num_samples(x: dict) -> int:
    """Rows (samples) of a sampling state."""
    v = next(iter(x.values()))
    return int((next(iter(v.values())) if isinstance(v, dict) else v).shape[0])


def _call_plan(
    model: GenerativeModel, windows: list[tuple[int, int]], samples: int, batch_size: int
) -> tuple[list[tuple[int, tuple[int, int]]], int, int]:
    """How :func:`blend_x0` runs a step: the (sample, window) pairs in order, how many
    consecutive pairs share a window (``repeats``), and the pairs per model call. A model
    that shares the conditions' work between samples gets each window's samples side by
    side in one call; every sample's windows are summed in the same order either way."""
    if model.shares_conditions and samples > 1:
        items = [(s, w) for w in windows for s in range(samples)]
        return items, samples, max(1, batch_size // samples) * samples
    return [(s, w) for s in range(samples) for w in windows], 1, batch_size


def model_calls(
    model: GenerativeModel, windows: list[tuple[int, int]], samples: int, batch_size: int
) -> int:
    """Model calls :func:`blend_x0` makes for one sampling step."""
    items, _, per_call = _call_plan(model, windows, samples, batch_size)
    return -(-len(items) // per_call)


def start_noise(seed: int, target: str, group: str, sample: int, channels: int) -> NoiseField:
    """The noise field a sample of a target's band group starts from."""
    return NoiseField(seed, f"{target}/{group}/start/{sample}", channels)


def step_noise(seed: int, target: str, group: str, step: int, sample: int, channels: int):
    """The fresh noise field of a stochastic sampling step."""
    return NoiseField(seed, f"{target}/{group}/step{step}/{sample}", channels)


def scene_seed(generator: torch.Generator | None) -> int:
    """The seed of a scene's noise fields, drawn from the caller's generator."""
    return int(torch.randint(2**62, (1,), generator=generator))


@torch.no_grad()
def sample_scene(
    model: GenerativeModel,
    scene: dict[str, Signal],
    targets: list[str],
    gsd: float,
    num_samples: int = 1,
    sampler: FlowSampler | None = None,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    given_bands: dict[str, dict[str, torch.Tensor]] | None = None,
    batch_size: int = 32,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Generated]:
    """Sample ``targets`` over a whole scene given every other modality in ``scene``.

    ``scene``: one-scene signals (batch 1) on a grid whose size is a multiple of the
    coarsest band-group factor and at least the model's window. Returns, per target, the
    x0 of ``num_samples`` samples: normalised values, class probabilities or vectors.
    ``given_bands`` (band infilling): per target and group a (1, C, 1, 1) mask of bands shown
    clean. ``on_step(done, total)`` reports progress in model calls.
    """
    sampler = sampler or FlowSampler()
    factors, windows = _layout(model, scene)
    # conditions no sample holds would only add masked tokens: leave them out
    scene = {n: s for n, s in scene.items() if n in targets or bool(s.present.any())}
    seed = scene_seed(generator)
    # the state of every target: one noise field per sample over the whole scene
    x: dict[str, object] = {}
    for n in targets:
        sig = scene[n]
        if sig.groups is not None:
            x[n] = {g: _field(seed, n, g, v, num_samples) for g, v in sig.groups.items()}
        else:
            x[n] = torch.randn((num_samples, sig.vector.shape[1]), generator=generator)
    ts = sampler.timesteps()
    calls_per_step = model_calls(model, windows, num_samples, batch_size) * (
        2 if guidance != 1.0 else 1
    )
    total_calls = sampler.steps * calls_per_step
    done = [0]

    def on_call() -> None:
        done[0] += 1
        if on_step is not None:
            on_step(done[0], total_calls)

    result: dict[str, Generated] = {}
    for i in range(sampler.steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        acc, norm, probs_acc = blend_x0(
            model, scene, targets, x, windows, t, gsd, factors, guidance, given_bands,
            batch_size, with_probs=t_next <= 0, on_call=on_call,
        )  # fmt: skip
        for n in targets:
            if isinstance(x[n], dict):
                x0 = {g: acc[n][g] / norm[n][g] for g in x[n]}
                fresh = {
                    g: torch.stack(
                        [
                            step_noise(seed, n, g, i, s, v.shape[1]).crop(0, 0, *v.shape[-2:])
                            for s in range(num_samples)
                        ]
                    )
                    if sampler.eta > 0 and t_next > 0
                    else None
                    for g, v in x0.items()
                }
                x[n] = {g: sampler.step(x0[g], x[n][g], t, t_next, generator, fresh[g]) for g in x0}
            else:
                x0 = acc[n] / norm[n]
                x[n] = sampler.step(x0, x[n], t, t_next, generator)
            if t_next <= 0:
                probs = {g: probs_acc[n][g] / norm[n][g] for g in probs_acc.get(n, {})}
                result[n] = Generated.final(scene[n], x0, probs)
    return result


def _crop_weight(weight: torch.Tensor, factor: int) -> torch.Tensor:
    """The blend weight on a group grid ``factor`` times coarser."""
    if factor == 1:
        return weight
    w = torch.nn.functional.avg_pool2d(weight[None, None], factor)[0, 0]
    return w


def _zeros_like_state(x: dict, weights_only: bool = False) -> dict:
    out = {}
    for n, v in x.items():
        if isinstance(v, dict):
            out[n] = {g: torch.zeros_like(a[:, :1] if weights_only else a) for g, a in v.items()}
        else:
            out[n] = torch.zeros(v.shape[0], 1) if weights_only else torch.zeros_like(v)
    return out


def _window_state(x: dict, chunk: list, size: int, factors: dict) -> dict:
    out = {}
    for n, v in x.items():
        if isinstance(v, dict):
            out[n] = {
                g: torch.stack([_crop(a[s], r, c, size, factors[n][g]) for s, (r, c) in chunk])
                for g, a in v.items()
            }
        else:
            out[n] = torch.stack([v[s] for s, _ in chunk])
    return out


def _expand_given(given: dict | None, n: int) -> dict | None:
    if not given:
        return None
    return {t: {g: m.expand(n, -1, -1, -1) for g, m in d.items()} for t, d in given.items()}


@torch.no_grad()
def sample_independent_tiles(
    model: GenerativeModel,
    scene: dict[str, Signal],
    targets: list[str],
    gsd: float,
    num_samples: int = 1,
    sampler: FlowSampler | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Generated]:
    """The usual tiling, for comparison: every window is sampled on its own, from its own
    noise, and the finished windows are blended with the same weight as
    :func:`sample_scene` uses. Neighbours do not agree where they overlap, so seams show."""
    size = model.config.window_size
    factors, windows = _layout(model, scene)
    first = next(n for n, sig in scene.items() if sig.groups is not None)
    height, width = next(iter(scene[first].groups.values())).shape[-2:]
    weight = blend_weight(size)
    acc: dict[str, dict[str, torch.Tensor]] = {}
    norm: dict[str, dict[str, torch.Tensor]] = {}
    for r, c in windows:
        sub = _window_signals(scene, [(r, c)], size, factors)
        out = sample_scene(model, sub, targets, gsd, num_samples, sampler, generator)
        for n in targets:
            res = out[n]
            payload = res.probs if res.probs is not None else res.groups
            if payload is None:
                continue
            for g, v in payload.items():
                f = factors[n][g]
                w = _crop_weight(weight, f)
                a = acc.setdefault(n, {}).setdefault(
                    g, torch.zeros(num_samples, v.shape[1], height // f, width // f)
                )
                m = norm.setdefault(n, {}).setdefault(g, torch.zeros(1, 1, height // f, width // f))
                _crop(a, r, c, size, f).add_(v * w)
                _crop(m, r, c, size, f).add_(w)
    result = {}
    for n in targets:
        blended = {g: acc[n][g] / norm[n][g] for g in acc.get(n, {})}
        if scene[n].target is not None:
            result[n] = Generated(probs=blended)
        else:
            result[n] = Generated(groups=blended)
    return result


# -- embeddings ----------------------------------------------------------------------------
def embed_stride(model: GenerativeModel) -> int:
    """Base-grid pixels between neighbouring embedding windows: the sampling stride (at
    least the coarsest band-group factor) rounded down to whole feature pixels, so every
    window's feature map lands on one global feature grid."""
    f = model.feature_factor
    groups = [g.factor for m in model.config.raster_modalities() for g in m.groups]
    stride = max(model.config.stride, max(groups, default=1))
    return max(f, stride // f * f)


def embed_layout(model: GenerativeModel, height: int, width: int) -> list[tuple[int, int]]:
    """(row, col) of every embedding window over a ``height`` x ``width`` base grid (both
    multiples of the feature factor and at least one window)."""
    size, stride = model.config.window_size, embed_stride(model)
    rows, cols = window_offsets(height, size, stride), window_offsets(width, size, stride)
    return [(r, c) for r in rows for c in cols]


def valid_pixels(scene: dict[str, Signal], factors: dict, height: int, width: int) -> torch.Tensor:
    """(height, width) bool on the base grid: some band of some raster input is known."""
    out = torch.zeros(height, width, dtype=torch.bool)
    for name, sig in scene.items():
        if sig.groups is None:
            continue
        for g, known in sig.known.items():
            k = known[0].amax(0) > 0  # (h, w) on the group grid
            f = factors[name][g]
            if f > 1:
                k = k.repeat_interleave(f, 0).repeat_interleave(f, 1)
            out |= k[:height, :width]
    return out


@torch.no_grad()
def embed_windows(
    model: GenerativeModel,
    scene: dict[str, Signal],
    gsd: float,
    windows: list[tuple[int, int]] | None = None,
    batch_size: int = 32,
    on_call: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature map of one-scene signals (batch 1, every modality given clean) and
    which feature pixels hold input.

    Windows of the model's size (``windows``: their (row, col) on this grid; default
    :func:`embed_layout`) run through :meth:`~GenerativeModel.feature_map` in batches;
    their maps are blended with the weight sampling uses (averaged onto the feature grid),
    so a feature pixel is decided mostly by the windows that see it with context, and a
    scene cut into tiles on one global layout gives the same map as one pass. Returns
    ((C, H / f, W / f) float32, (H / f, W / f) bool), f the model's feature factor; a
    feature pixel holds input where any base-grid pixel under it does."""
    size, f = model.config.window_size, model.feature_factor
    reg = model.config.registry
    scene = {n: s for n, s in scene.items() if bool(s.present.any())}
    factors = {n: {g.name: g.factor for g in reg[n].groups} for n, s in scene.items() if s.groups}
    if not factors:
        raise TerrasynthError("embedding needs at least one raster input")
    first = next(iter(factors))
    g0, x = next(iter(scene[first].groups.items()))
    height, width = (d * factors[first][g0] for d in x.shape[-2:])
    if height % f or width % f or size % f:
        raise TerrasynthError(
            f"a grid of {width} x {height} px and windows of {size} px must be multiples of "
            f"the model's feature factor {f}"
        )
    windows = embed_layout(model, height, width) if windows is None else windows
    weight = _crop_weight(blend_weight(size), f)
    acc = torch.zeros(model.feature_channels, height // f, width // f)
    norm = torch.zeros(1, height // f, width // f)
    device = model_device(model)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        sigs = _window_signals(scene, chunk, size, factors)
        gsd_b = torch.full((len(chunk),), float(gsd))
        inputs = sampling_inputs(sigs, [], {}, 0.0, gsd_b, None, True)
        if device.type != "cpu":
            inputs, gsd_b = to_device(inputs, device), gsd_b.to(device)
        feats = model.feature_map(inputs, gsd_b).float().cpu()
        if on_call is not None:
            on_call()
        for k, (r, c) in enumerate(chunk):
            _crop(acc, r, c, size, f).add_(feats[k] * weight)
            _crop(norm, r, c, size, f).add_(weight)
    valid = valid_pixels(scene, factors, height, width)
    valid = torch.nn.functional.max_pool2d(valid[None, None].float(), f)[0, 0] > 0
    return acc / norm.clamp_min(1e-12), valid
