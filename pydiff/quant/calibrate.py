"""Timestep-aware calibration (Q-Diffusion): activation statistics over a whole sampling trajectory.

:class:`Calibrator` attaches forward hooks to the layers that will be quantized, runs a user's
``calibration`` callable (which runs the model over every timestep of one or more sampling
trajectories, e.g. a few steps of :func:`pydiff.samplers.sample`) and collects, per layer:

* ``absmax[c] = max over every call (every timestep, uniformly) and every token of |x[..., c]|``,
  the per input-channel activation maximum (``[K]`` for a Linear, ``[Cin]`` for a Conv2d): the
  SmoothQuant statistics;
* a subsample of the layer's inputs, evenly spaced over the trajectory (at most ``keep_calls``
  calls; each call's inputs limited to ``keep_rows`` token rows for a Linear and to the first batch
  item for a Conv2d), for the per-layer SQNR report;
* the split points of concatenated skip inputs (Q-Diffusion's split shortcut): a forward pre-hook
  on every diffusers up block (a module with ``resnets`` that receives ``res_hidden_states_tuple``)
  records the channels of the skip tensors; resnet ``j`` concatenates ``[h, skip_j]`` with
  ``skip_j = res_hidden_states_tuple[-1 - j]``, so its ``conv1`` and ``conv_shortcut`` split at
  ``in_channels - skip_j.shape[1]``;

and, at the model level, the model's inputs and outputs of (a subsample of) every call, so the
quantized model can be evaluated on exactly the 16-bit trajectory's inputs.

Timesteps are weighted uniformly because every model call contributes to the running maximum and
the kept calls are evenly spaced (the stride doubles whenever the buffer fills).

Papers: Q-Diffusion (Li et al. 2023), SmoothQuant (Xiao et al. 2023).
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["Calibrator", "EvenSubsample", "first_tensor", "run_calibration", "sqnr_db"]


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(sum ref^2 / sum (ref - approx)^2)`` in float64 (inf when equal)."""
    r, a = ref.detach().to(torch.float64), approx.detach().to(torch.float64)
    sig, err = r.square().sum().item(), (r - a).square().sum().item()
    if err == 0.0:
        return float("inf")
    if sig == 0.0:
        return float("-inf")
    import math

    return 10.0 * math.log10(sig / err)


def first_tensor(out):
    """The prediction tensor of a model output (a tensor, a diffusers ``*Output`` with ``.sample``, a
    tuple / list / dict whose first element is one), or None."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def _detach_clone(tree):
    return tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a, tree)


class EvenSubsample:
    """Keeps at most ``2 * limit`` (at least ``limit``) items of a stream, evenly spaced: every item
    while there is room, then every other, and so on (the stride doubles when the buffer fills)."""

    def __init__(self, limit: int):
        self.limit, self.stride, self.count, self.items = max(int(limit), 1), 1, 0, []

    def want(self) -> bool:
        return self.count % self.stride == 0

    def push(self, item) -> None:
        if self.want():
            self.items.append(item)
        self.count += 1
        if len(self.items) > 2 * self.limit:
            self.items = self.items[::2]
            self.stride *= 2

    def skip(self) -> None:
        self.count += 1


def run_calibration(calibration: Callable, model: nn.Module):
    """Call ``calibration(model)`` (or ``calibration()`` if it takes no argument) under no_grad."""
    try:
        params = inspect.signature(calibration).parameters.values()
        takes_model = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    except (TypeError, ValueError):
        takes_model = True
    with torch.no_grad():
        return calibration(model) if takes_model else calibration()


class Calibrator:
    """Forward hooks that collect activation statistics, inputs, model calls and skip splits.

    Use as a context manager around the calibration run::

        with Calibrator(model, {"blocks.0.attn.qkv": layer, ...}) as cal:
            run_calibration(fn, model)
        cal.absmax["blocks.0.attn.qkv"]   # [K] fp32
        cal.inputs["blocks.0.attn.qkv"]   # list of input tensors (evenly spaced over the calls)
        cal.splits                        # {"up_blocks.0.resnets.0.conv1": 64, ...}
        cal.model_calls                   # list of (args, kwargs, output tensor)
    """

    def __init__(self, model: nn.Module, layers: Dict[str, nn.Module], keep_calls: int = 8, keep_rows: int = 256,
                 record_inputs: bool = True, record_model_calls: bool = True, detect_splits: bool = True):
        self.model, self.layers = model, layers
        self.keep_calls, self.keep_rows = keep_calls, keep_rows
        self.record_inputs, self.record_model_calls = record_inputs, record_model_calls
        self.detect_splits = detect_splits
        self.absmax: Dict[str, torch.Tensor] = {}
        self.calls: Dict[str, int] = {}
        self._inputs: Dict[str, EvenSubsample] = {}
        self._model_calls = EvenSubsample(keep_calls)
        self._pending_call = None
        self.splits: Dict[str, int] = {}
        self._handles: List = []

    # ------------------------------------------------------------------ hooks
    def _layer_hook(self, name: str):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if not isinstance(x, torch.Tensor) or x.numel() == 0:  # (an empty batch carries no statistics)
                return
            x = x.detach()
            if isinstance(mod, nn.Conv2d):
                cdim = 1 if x.dim() == 4 else 0
                dims = tuple(d for d in range(x.dim()) if d != cdim)
                am = x.abs().amax(dim=dims).float()
            else:
                am = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            prev = self.absmax.get(name)
            self.absmax[name] = am if prev is None else torch.maximum(prev, am)
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.record_inputs:
                sub = self._inputs.setdefault(name, EvenSubsample(self.keep_calls))
                if sub.want():
                    if isinstance(mod, nn.Conv2d):
                        keep = (x[:1] if x.dim() == 4 else x).clone()
                    else:
                        rows = x.reshape(-1, x.shape[-1])
                        step = max(1, -(-rows.shape[0] // self.keep_rows))
                        keep = rows[::step].clone()
                    sub.push(keep)
                else:
                    sub.skip()
        return hook

    def _up_block_hook(self, name: str):
        def hook(mod, args, kwargs):
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if not isinstance(res, (tuple, list)) or not all(isinstance(r, torch.Tensor) for r in res):
                return
            for j, resnet in enumerate(mod.resnets):
                if j >= len(res):
                    break
                conv1 = getattr(resnet, "conv1", None)
                cin = getattr(resnet, "in_channels", None) or getattr(conv1, "in_channels", None)
                if cin is None:
                    continue
                split = int(cin) - int(res[-1 - j].shape[1])
                if not 0 < split < cin:
                    continue
                for child in ("conv1", "conv_shortcut"):
                    m = getattr(resnet, child, None)
                    if isinstance(m, nn.Module) and getattr(m, "in_channels", None) == cin:
                        self.splits[f"{name}.resnets.{j}.{child}"] = split
        return hook

    def _model_pre_hook(self, mod, args, kwargs):
        self._pending_call = _detach_clone((args, kwargs)) if self._model_calls.want() else None

    def _model_hook(self, mod, args, kwargs, out):
        if self._pending_call is not None:
            y = first_tensor(out)
            self._model_calls.push((*self._pending_call, None if y is None else y.detach().clone()))
        else:
            self._model_calls.skip()
        self._pending_call = None

    def __enter__(self) -> "Calibrator":
        for name, mod in self.layers.items():
            self._handles.append(mod.register_forward_pre_hook(self._layer_hook(name), with_kwargs=True))
        if self.detect_splits:
            for name, mod in self.model.named_modules():
                if isinstance(getattr(mod, "resnets", None), nn.ModuleList) and _takes_res_hidden(mod):
                    self._handles.append(mod.register_forward_pre_hook(self._up_block_hook(name), with_kwargs=True))
        if self.record_model_calls:
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._model_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ results
    @property
    def inputs(self) -> Dict[str, list]:
        return {k: v.items for k, v in self._inputs.items()}

    @property
    def model_calls(self) -> list:
        return self._model_calls.items


def _takes_res_hidden(mod: nn.Module) -> bool:
    try:
        return "res_hidden_states_tuple" in inspect.signature(mod.forward).parameters
    except (TypeError, ValueError):
        return False
