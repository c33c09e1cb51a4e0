"""``quantize_(model, config, calibration)``: convert a diffusion model's Linear / Conv2d layers in place.

Steps:

1. Pick the layers: every ``nn.Linear`` and (``config.convs``) every ``groups=1``, zero-padded
   ``nn.Conv2d`` whose qualified name matches none of ``config.skip`` (regular expressions,
   ``re.search``) and whose input and output sizes are at least ``config.min_features``.  The
   default skip list keeps in 16 bits what QuEST (Wang et al. 2024) found sensitive: the time (and
   class) embedding, including the per-block ``time_emb_proj`` that reads it; the first and the
   last layer (``conv_in`` / ``conv_out``, ``x_embedder`` / ``proj_out`` / ``final_layer``); and,
   for DiT, the adaLN modulation linears (their input is the conditioning vector, one row a sample:
   no speed to gain, and errors there scale every token of a block).
2. Calibrate (optional, Q-Diffusion): ``calibration(model)`` runs the 16-bit model over a whole
   sampling trajectory (all timesteps; deterministic, e.g. a seeded generator); forward hooks
   collect per input-channel activation maxima (for SmoothQuant factors with
   ``config.smooth_alpha``), a subsample of each layer's inputs, the model's inputs and outputs, and
   the split points of the concatenated skip inputs of diffusers up blocks (see
   :mod:`pydiff.quant.calibrate`).
3. Replace each layer with a :class:`~pydiff.quant.layers.QuantizedLinear` /
   :class:`~pydiff.quant.layers.QuantizedConv2d` (W4A4 for ``fmt="int4"``, W8A8 for int8 / fp8),
   with split-shortcut quantization (two input-channel parts, own groups and smoothing) where a
   split point is known: ``config.splits`` (user, by layer name) first, then calibration.
4. Report (:class:`QuantReport`): per converted layer its SQNR (dB) against the 16-bit layer on the
   recorded calibration inputs, and the model output error against the 16-bit model on the
   recorded model calls (same inputs, so per-evaluation error) and on the whole sampled result
   (``calibration`` run again on the quantized model, when it returns a tensor).

Papers: Q-Diffusion (Li et al. 2023), QuEST (Wang et al. 2024), SmoothQuant (Xiao et al. 2023),
SVDQuant (Li et al. 2025).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from pydiff.quant.calibrate import Calibrator, first_tensor, run_calibration
from pydiff.quant.layers import (PARAM_DTYPES, QuantizedConv2d, QuantizedLayer, W4A4Conv2d, W4A4Linear, W8A8Conv2d,
                                 W8A8Linear, resolve_group_size)
from pydiff.reference.quant import FORMATS

__all__ = ["DEFAULT_SKIP", "LayerReport", "QuantConfig", "QuantReport", "quantize_"]

DEFAULT_SKIP = (
    r"time_emb",              # diffusers time_embedding.* and resnets' time_emb_proj; ADM time_embed.*
    r"(^|\.)t_embedder\.",    # DiT
    r"timestep_embedder|time_text_embed|add_embedding",  # PixArt / SD3 / Flux; SDXL's added time ids
    r"class_embedding|(^|\.)y_embedder\.|label_emb",
    r"adaLN_modulation",      # DiT modulation from the conditioning vector
    r"^conv_in$", r"^conv_out$",                       # UNet first / last conv
    r"^x_embedder", r"^pos_embed", r"^patch_embed",    # DiT / SD3 patch embedding (first layer)
    r"^proj_out", r"^final_layer", r"^norm_out",       # DiT / SD3 output layers (last layer)
)


@dataclass
class QuantConfig:
    """What :func:`quantize_` converts, and how.

    Attributes:
        fmt: ``"int4"`` (W4A4), ``"int8"`` or ``"fp8"`` (W8A8, e4m3).
        group_size: channels per scale (multiple of 32); None: one scale per token / output channel.
        rank: R of the 16-bit SVDQuant low-rank branch of Linear layers (capped at min(N, K)); 0: off.
        conv_rank: the same for Conv2d layers (default 0).
        smooth_alpha: SmoothQuant migration strength in [0, 1] (needs calibration); None: no smoothing.
        skip: regular expressions (``re.search`` on the qualified module name) of layers kept in 16 bits.
        min_features: layers with fewer input or output features / channels stay in 16 bits.
        convs: also convert Conv2d layers.
        split_shortcut: split-shortcut quantization of concatenated skip inputs (splits found by
            calibration on diffusers up blocks).
        splits: ``{layer_name: split_channel}`` given by the user (wins over calibration).
        out_dtype: output dtype of the quantized layers; None: their input's.
        keep_calls / keep_rows: calibration inputs kept per layer for the report (evenly spaced calls;
            token rows per call for a Linear, the first batch item for a Conv2d).
        report_sample: rerun ``calibration`` on the quantized model to compare the final samples.
    """

    fmt: str = "int4"
    group_size: Optional[int] = 64
    rank: int = 32
    conv_rank: int = 0
    smooth_alpha: Optional[float] = 0.5
    skip: Sequence[str] = DEFAULT_SKIP
    min_features: int = 16
    convs: bool = True
    split_shortcut: bool = True
    splits: Mapping[str, int] = field(default_factory=dict)
    out_dtype: Optional[torch.dtype] = None
    keep_calls: int = 8
    keep_rows: int = 256
    report_sample: bool = True

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt: expected one of {FORMATS}, got {self.fmt!r}")
        resolve_group_size(self.group_size, 1)
        for name in ("rank", "conv_rank", "min_features", "keep_calls", "keep_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name.startswith("keep") else 0):
                raise ValueError(f"{name}: expected an int >= {1 if name.startswith('keep') else 0}, got {v!r}")
        a = self.smooth_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise ValueError(f"smooth_alpha: expected None or a number in [0, 1], got {a!r}")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise TypeError(f"skip: expected a sequence of regular-expression strings, got {self.skip!r}")
        for p in self.skip:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"skip: invalid regular expression {p!r}: {e}") from None
        if not isinstance(self.splits, Mapping) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
                for k, v in self.splits.items()):
            raise ValueError(f"splits: expected a mapping {{layer_name: split_channel > 0}}, got {self.splits!r}")
        if self.out_dtype is not None and self.out_dtype not in PARAM_DTYPES:
            raise TypeError(f"out_dtype: expected None, float32, float16 or bfloat16, got {self.out_dtype}")


@dataclass
class LayerReport:
    """One converted layer: its quantized class, sizes, options, and SQNR (dB) against the 16-bit
    layer on the calibration inputs (None without calibration)."""

    name: str
    kind: str
    fmt: str
    in_features: int
    out_features: int
    group_size: Optional[int]
    rank: int
    smoothed: bool
    splits: tuple
    sqnr_db: Optional[float] = None


@dataclass
class QuantReport:
    """What :func:`quantize_` did.

    ``layers``: converted layers by name; ``skipped``: name -> why it stayed in 16 bits;
    ``model_rel_l2`` / ``model_sqnr_db``: the quantized model's outputs against the recorded 16-bit
    outputs on the same (recorded) inputs, ``||y_q - y||_2 / ||y||_2`` and SQNR, pooled over the
    recorded calls; ``sample_rel_l2`` / ``sample_sqnr_db``: the same for the final results of the
    whole calibration run (errors accumulated over the trajectory).  None where not measured.
    """

    layers: Dict[str, LayerReport] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    model_rel_l2: Optional[float] = None
    model_sqnr_db: Optional[float] = None
    sample_rel_l2: Optional[float] = None
    sample_sqnr_db: Optional[float] = None

    def __str__(self) -> str:
        lines = [f"{'layer':<48} {'kind':<16} {'K':>6} {'N':>6} {'G':>5} {'R':>3} sm split  SQNR dB"]
        for r in self.layers.values():
            s = "-" if r.sqnr_db is None else f"{r.sqnr_db:7.2f}"
            g = "row" if r.group_size is None else str(r.group_size)
            sp = ",".join(map(str, r.splits)) or "-"
            lines.append(f"{r.name:<48} {r.kind:<16} {r.in_features:>6} {r.out_features:>6} {g:>5} {r.rank:>3} "
                         f"{'y' if r.smoothed else 'n':>2} {sp:>5} {s:>8}")
        lines.append(f"{len(self.layers)} layers converted, {len(self.skipped)} kept in 16 bits")
        for what in ("model", "sample"):
            rel, sq = getattr(self, f"{what}_rel_l2"), getattr(self, f"{what}_sqnr_db")
            if rel is not None:
                lines.append(f"{what} output vs 16-bit: relative L2 {rel:.4g}, SQNR {sq:.2f} dB")
        return "\n".join(lines)


def _classes(fmt: str):
    return (W4A4Linear, W4A4Conv2d) if fmt == "int4" else (W8A8Linear, W8A8Conv2d)


def _select(model: nn.Module, config: QuantConfig):
    skip = [re.compile(p) for p in config.skip]
    chosen, skipped = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLayer):
            skipped[name] = "already quantized"
            continue
        is_lin = isinstance(mod, nn.Linear)
        is_conv = isinstance(mod, nn.Conv2d)
        if not (is_lin or is_conv):
            continue
        if is_conv and not config.convs:
            skipped[name] = "convs=False"
            continue
        pat = next((p.pattern for p in skip if p.search(name)), None)
        if pat is not None:
            skipped[name] = f"skip pattern {pat!r}"
            continue
        if is_conv:
            try:
                QuantizedConv2d.check_conv(mod)
            except (TypeError, ValueError) as e:
                skipped[name] = str(e).replace("conv: ", "")
                continue
        k = mod.in_features if is_lin else mod.in_channels
        n = mod.out_features if is_lin else mod.out_channels
        if min(k, n) < config.min_features:
            skipped[name] = f"smaller than min_features={config.min_features}"
            continue
        if mod.weight.dtype not in PARAM_DTYPES:
            skipped[name] = f"weight dtype {mod.weight.dtype}"
            continue
        chosen[name] = mod
    return chosen, skipped


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _sqnr_of(ref_out, q_out, acc):
    r, a = ref_out.detach().to(torch.float64), q_out.detach().to(torch.float64)
    acc[0] += r.square().sum().item()
    acc[1] += (r - a).square().sum().item()


def _db(sig: float, err: float) -> float:
    if err == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    return 10.0 * math.log10(sig / err)


def quantize_(model: nn.Module, config: Optional[QuantConfig] = None, calibration: Optional[Callable] = None,
              ) -> QuantReport:
    """Convert ``model``'s Linear / Conv2d layers in place to ``config``'s formats; return a report.

    Args:
        model: any ``nn.Module`` (a diffusers ``UNet2DModel``, :class:`pydiff.models.DiT`, ...).
        config: :class:`QuantConfig` (default: W4A4, group 64, rank 32, SmoothQuant alpha 0.5).
        calibration: ``calibration(model)`` (or a zero-argument callable) that runs the model over a
            whole sampling trajectory, deterministically; e.g.
            ``lambda m: pydiff.samplers.sample(wrap(m), shape, "ddim", steps=8, generator=g())``.
            Optional: without it there is no smoothing, no calibrated split detection and no SQNR.

    Returns:
        :class:`QuantReport` (per-layer SQNR, model output error against the 16-bit model).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config: expected a pydiff.quant.QuantConfig, got {type(config).__name__}")
    if calibration is not None and not callable(calibration):
        raise TypeError(f"calibration: expected a callable that runs the model, got {type(calibration).__name__}")

    chosen, skipped = _select(model, config)
    report = QuantReport(skipped=skipped)
    cal = None
    sample_ref = None
    if calibration is not None:
        with Calibrator(model, chosen, keep_calls=config.keep_calls, keep_rows=config.keep_rows,
                        detect_splits=config.split_shortcut) as cal:
            sample_ref = first_tensor(run_calibration(calibration, model))
        nonfinite = [n for n, a in cal.absmax.items() if not bool(torch.isfinite(a).all())]
        if nonfinite:
            raise ValueError(f"calibration: the inputs of layer(s) {nonfinite[:5]} held NaN or inf during calibration "
                             f"(smoothing factors and the SQNR report would be NaN); calibrate on finite data")
        if sample_ref is not None:
            sample_ref = sample_ref.detach().clone()

    splits: Dict[str, int] = dict(cal.splits) if (cal is not None and config.split_shortcut) else {}
    for k in config.splits:
        if k not in chosen:
            raise ValueError(f"splits: {k!r} is not a layer that is being converted")
    splits.update(config.splits)

    lin_cls, conv_cls = _classes(config.fmt)
    fmt_kw = {} if config.fmt == "int4" else {"fmt": config.fmt}
    converted = {}
    with torch.no_grad():
        for name, mod in chosen.items():
            stats = cal.absmax.get(name) if (cal is not None and config.smooth_alpha is not None) else None
            kw = dict(group_size=config.group_size, smooth=stats, alpha=config.smooth_alpha or 0.0,
                      splits=(splits[name],) if name in splits else (), out_dtype=config.out_dtype, **fmt_kw)
            if isinstance(mod, nn.Linear):
                q = lin_cls.from_linear(mod, rank=config.rank, **kw)
                k, n = mod.in_features, mod.out_features
            else:
                q = conv_cls.from_conv(mod, rank=config.conv_rank, **kw)
                k, n = mod.in_channels, mod.out_channels
            converted[name] = (mod, q)
            report.layers[name] = LayerReport(name, type(q).__name__, q.fmt, k, n, q.group_size, q.rank,
                                              q.has_smooth, q.splits)
        for name, (_, q) in converted.items():
            _replace(model, name, q)

        if cal is not None:
            inputs = cal.inputs
            for name, (fp, q) in converted.items():
                xs = inputs.get(name, [])
                if not xs:
                    continue
                acc = [0.0, 0.0]
                for x in xs:
                    _sqnr_of(fp(x), q(x), acc)
                report.layers[name].sqnr_db = _db(*acc)
            acc = [0.0, 0.0]
            for args, kwargs, y in cal.model_calls:
                if y is None:
                    continue
                yq = first_tensor(model(*args, **kwargs))
                if yq is not None:
                    _sqnr_of(y, yq, acc)
            if acc[0] > 0:
                report.model_rel_l2 = math.sqrt(acc[1] / acc[0])
                report.model_sqnr_db = _db(*acc)
            if config.report_sample and sample_ref is not None:
                yq = first_tensor(run_calibration(calibration, model))
                if yq is not None and yq.shape == sample_ref.shape:
                    acc = [0.0, 0.0]
                    _sqnr_of(sample_ref, yq, acc)
                    if acc[0] > 0:
                        report.sample_rel_l2 = math.sqrt(acc[1] / acc[0])
                        report.sample_sqnr_db = _db(*acc)
    return report
