"""``apply``: patch a pipeline, a combiner or a list of control models; the handle undoes it.

One file (over 400 lines) because ``apply`` and the handle it returns patch and undo the same
objects, and are read together.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from maxfusion_kernels import MAX_INPUTS

from ._fusion import Record, Recorder, fuse_residual_groups, make_settings
from ._lockstep import (
    FusionPoint,
    Lockstep,
    check_points,
    check_same_architecture,
    collect_tensors,
    replace_tensors,
    resolve_points,
)
from ._masks import RegionMasks, image_masks
from ._parallel import cp_config, plan_splits_residuals
from .handlers import CombinerHandler, Job, find_combiner, find_family

LEVELS = ("residual", "block")

# every object a live handle patches -> a weak reference to that handle (an object is patched
# by one handle at most). The patches themselves (the combiner's forward, the hooks) hold the
# handle, so it lives as long as what it patches.
_PATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class AlreadyAppliedError(RuntimeError):
    """``apply`` on a pipeline, combiner or model that a live handle already patches."""


class MaxFusionHandle:
    """What :func:`apply` returns: undo with :meth:`remove` (or use it as a context manager).

    Attributes:
        level: ``"residual"`` or ``"block"``.
        records: with ``record=True``, a list of :class:`Record` ``(step, point, winner)``.
        steps: the number of fused calls so far (the ``step`` of the next one).
        active: False once removed.
        masks: the regional masks in use (``[Bm, H, W]`` float32 tensors or ``None``, one
            per control model), or ``None``; change them with :meth:`set_masks`.
    """

    def __init__(self, level: str, settings, recorder: Recorder, models: list[nn.Module],
                 handler: CombinerHandler | None, combiner: nn.Module | None):
        self.level = level
        self._settings = settings
        self._recorder = recorder
        self._models = models
        self._handler = handler
        self._combiner = combiner
        self._lockstep: Lockstep | None = None
        self._undo: list[Callable[[], None]] = []
        self._region: RegionMasks | None = None
        self._grid: tuple[int, int] | None = None  # the token grid of the call in progress
        self._pipe: weakref.ref | None = None  # a Flux / QwenImage pipeline: its transformer's CP
        self.active = True

    # ---- public ----

    @property
    def records(self) -> list[Record]:
        return self._recorder.records

    @property
    def steps(self) -> int:
        return self._recorder.step

    def clear_records(self) -> None:
        self._recorder.records.clear()

    @property
    def masks(self) -> list | None:
        return None if self._region is None else list(self._region.masks)

    def set_masks(self, masks: Sequence[Any] | None) -> None:
        """Set (or with ``None`` clear) the regional masks for the next calls, without
        applying again: one entry per control model (per condition for a Flux or QwenImage
        ControlNet-Union run once per condition), ``None`` or an image-space mask (a PIL
        image, a numpy array or a tensor, ``[H, W]`` or ``[B, H, W]``, values in [0, 1];
        see :func:`apply`). Raises ``TypeError`` / ``ValueError`` naming ``masks[i]``, and
        leaves the masks in use unchanged then."""
        self._check_active()
        if masks is None:
            self._region = None
            return
        if self._settings.process_group is not None:
            raise ValueError(_MASKS_SHARDED)
        n = len(self._models) if self._combiner is None or len(self._models) > 1 else None
        self._region = RegionMasks(image_masks(masks, n))

    @property
    def mask_resizes(self) -> int:
        """How many masks were resized to a fusion's grid so far (the resized masks are cached
        per grid, batch, device and dtype: a denoising loop resizes in its first step only)."""
        return 0 if self._region is None else self._region.resizes

    def remove(self) -> None:
        """Undo every patch (instance ``forward``, hooks); a second call does nothing.

        Patches are undone in reverse order. If one cannot be undone (the combiner's forward
        was replaced by someone else after ``apply``), nothing further is undone, the handle
        stays active and the error says what to remove first; ``remove()`` can then be called
        again.
        """
        if not self.active:
            return
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except BaseException:
                self._undo.append(undo)
                raise
        self.active = False

    def __enter__(self) -> MaxFusionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        what = type(self._combiner).__name__ if self._combiner is not None else (
            f"{len(self._models)} models")
        state = "active" if self.active else "removed"
        return f"<MaxFusionHandle level={self.level!r} on {what}, {state}>"

    def run(self, inputs: Sequence[Any], kwargs: dict | Sequence[dict] | None = None, *,
            weights: Sequence[float] | None = None) -> Any:
        """Run a handle's list of models on their inputs and merge their outputs.

        Args:
            inputs: one entry per model: a tuple (or list) of positional arguments, or a single
                argument.
            kwargs: keyword arguments shared by every model (a dict) or one dict per model.
            weights: one float >= 0 per model, applied to its outputs in the final merge (the
                internal block-level fusions are unweighted); a model of weight 0 is not run.

        Returns:
            Model 0's output structure with every floating tensor replaced by the merge of the
            models' tensors at that place (fused with ``merge``; at block level the models ran
            in lockstep with ``unmerge`` at the fusion points).
        """
        if self._combiner is not None:
            raise TypeError("run() is for handles made on a list of models; this handle patches "
                            f"{type(self._combiner).__name__}: call the pipeline or combiner")
        self._check_active()
        n = len(self._models)
        if len(inputs) != n:
            raise ValueError(f"run() needs one input per model: {n} models, {len(inputs)} inputs")
        if kwargs is None or isinstance(kwargs, dict):
            per_kwargs = [dict(kwargs or {})] * n
        else:
            per_kwargs = [dict(k) for k in kwargs]
            if len(per_kwargs) != n:
                raise ValueError(f"run() got {len(per_kwargs)} kwargs dicts for {n} models")
        w = [1.0] * n if weights is None else [float(x) for x in weights]
        if len(w) != n:
            raise ValueError(f"run() got {len(w)} weights for {n} models")
        jobs = []
        for i, (model, x, kw) in enumerate(zip(self._models, inputs, per_kwargs)):
            args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            jobs.append(Job(i, model, w[i], _bind_call(model, args, kw)))
        return self._fused_call(jobs, _flatten_any, _pack_any, weights_apply=weights is not None,
                                nothing=lambda js: _zeros_like_output(js[0].call()))

    # ---- internals ----

    def _check_active(self) -> None:
        if not self.active:
            raise RuntimeError("this MaxFusionHandle has been removed")

    def _masks_for(self, feats: Sequence[Any], nets: Sequence[int], *, hard: bool):
        """The regional masks of the models ``nets`` at the grid of ``feats`` (or ``None``)."""
        if self._region is None:
            return None
        return self._region.for_features(feats, self._settings.channel_dim, nets,
                                         grid=self._grid, hard=hard)

    def _replicated_cp(self):
        """The context-parallel config of the pipeline's transformer when this rank must
        return its share of the (replicated) fused residuals, else ``None``."""
        pipe = self._pipe() if self._pipe is not None else None
        if pipe is None or self._settings.process_group is not None:
            return None
        transformer = getattr(pipe, "transformer", None)
        cpc = cp_config(transformer)
        if cpc is None or plan_splits_residuals(transformer):
            return None
        return cpc

    def _fused_call(self, jobs: list[Job], flatten, pack, *, weights_apply: bool, nothing,
                    grid: tuple[int, int] | None = None):
        rec = self._recorder
        try:
            if self._region is not None and len(self._region) != len(jobs):
                raise ValueError(
                    f"masks has {len(self._region)} entries but this call runs {len(jobs)} "
                    "control models (conditions); set one mask or None per model with "
                    "handle.set_masks")
            active = [j for j in jobs if j.scale != 0]
            if not active:
                return nothing(jobs)
            nets = [j.index for j in active]
            self._grid = grid
            if self.level == "block" and len(active) > 1:
                outs = self._lockstep.run([j.call for j in active], nets)
            else:
                outs = [j.call() for j in active]
            flat = [flatten(o) for o in outs]
            names = [name for name, _ in flat[0]]
            for k, f in enumerate(flat[1:], start=1):
                if [name for name, _ in f] != names:
                    raise ValueError(
                        f"net {nets[k]} returned residuals {[nm for nm, _ in f]}, net "
                        f"{nets[0]} returned {names}: they cannot be fused index by index"
                    )
            groups = [[f[k][1] for f in flat] for k in range(len(names))]
            masks = None
            if self._region is not None:
                masks = [None if any(t is None for t in g) else
                         self._masks_for(g, nets, hard=False) for g in groups]
            fused = fuse_residual_groups(
                groups, settings=self._settings, names=names, nets=nets,
                weights=[j.scale for j in active] if weights_apply else None, recorder=rec,
                masks=masks,
            )
            return pack(fused, outs[0])
        finally:
            self._grid = None
            rec.step += 1

    def _patch_forward(self, module: nn.Module, forward: Callable) -> None:
        """Set ``forward`` as the module's forward: on the instance, or, under an accelerate
        hook (``enable_model_cpu_offload`` and friends wrap the instance's forward and call
        ``module._old_forward`` at every call), as the ``_old_forward`` the hook calls, so the
        hook keeps moving the module and its inputs to the execution device."""
        d = module.__dict__
        if "forward" not in d or _is_class_forward(module, d["forward"]):
            slot = "forward"  # (an accelerate hook removed leaves the class forward bound here)
        elif "_hf_hook" in d and _is_class_forward(module, d.get("_old_forward")):
            slot = "_old_forward"
        else:
            raise RuntimeError(
                f"{type(module).__name__} already has a forward set on the instance (another "
                "patch than accelerate's hooks, or a hook over such a patch); "
                "maxfusion_hooks.apply needs the class forward, so apply it before that patch "
                "or remove the patch first"
            )
        setattr(module, slot, forward)

        def undo():
            if d.get("forward") is forward:
                del d["forward"]
            elif d.get("_old_forward") is forward:  # an accelerate hook came on top: keep it
                d["_old_forward"] = types.MethodType(type(module).forward, module)
            elif "forward" in d and not _is_class_forward(module, d["forward"]):
                raise RuntimeError(
                    f"the forward of {type(module).__name__} was replaced after apply() by a "
                    "patch that does not call it through _old_forward as accelerate's hooks do; "
                    "remove that patch first, then this one"
                )

        self._undo.append(undo)

    def _claim(self, objs: Sequence[Any]) -> None:
        for obj in objs:
            ref = _PATCHED.get(obj)
            other = ref() if ref is not None else None
            if other is not None and other is not self and other.active:
                raise AlreadyAppliedError(
                    f"{type(obj).__name__} is already patched by {other!r}; call its remove() "
                    "(or leave its with-block) before applying MaxFusion again"
                )
        me = weakref.ref(self)  # a weak value: a forgotten handle does not keep models alive
        for obj in objs:
            _PATCHED[obj] = me

            def release(obj=obj):
                if _PATCHED.get(obj) is me:
                    del _PATCHED[obj]

            self._undo.append(release)


_MASKS_SHARDED = (
    "regional masks are not supported with process_group: each rank would need the masks at "
    "its own share of the tokens; use max_fuse(..., masks=..., process_group=...) directly")


def _is_class_forward(module: nn.Module, f: Any) -> bool:
    """Whether ``f`` is the module's class forward bound to the module itself."""
    return (getattr(f, "__self__", None) is module
            and getattr(f, "__func__", None) is type(module).forward)


def _bind_call(model: nn.Module, args: tuple, kwargs: dict) -> Callable[[], Any]:
    return lambda: model(*args, **kwargs)


def _flatten_any(out) -> list[tuple[str, Any]]:
    return [(f"out{path}", t) for path, t in collect_tensors(out)]


def _pack_any(fused: list, template) -> Any:
    return replace_tensors(template, {id(t): f for (_, t), f in
                                      zip(collect_tensors(template), fused)})


def _zeros_like_output(out) -> Any:
    return replace_tensors(out, {id(t): t * 0.0 for _, t in collect_tensors(out)})


def _find_combiner_in(pipe) -> tuple[nn.Module, CombinerHandler] | None:
    comps = getattr(pipe, "components", None)
    candidates = list(comps.values()) if isinstance(comps, dict) else []
    candidates += [getattr(pipe, a, None) for a in ("controlnet", "adapter")]
    for comp in candidates:
        h = find_combiner(comp) if comp is not None else None
        if h is not None:
            return comp, h
    return None


def apply(
    target: Any,
    *,
    level: str = "residual",
    record: bool = False,
    points: Any = None,
    global_pool: str = "mean",
    masks: Sequence[Any] | None = None,
    process_group: Any = None,
    **max_fuse_options: Any,
) -> MaxFusionHandle:
    """Fuse several control models with MaxFusion instead of summing / averaging them.

    Args:
        target: a diffusers pipeline with a multi-condition combiner (e.g. a ControlNet pipeline
            built with a list of ControlNets), the combiner itself (``MultiControlNetModel``,
            ``MultiControlNetUnionModel``, ``SD3MultiControlNetModel``,
            ``FluxMultiControlNetModel``, ``QwenImageMultiControlNetModel``,
            ``HunyuanDiT2DMultiControlNetModel``, ``MultiAdapter``), or a list of 2..8 control
            models (diffusers or raw PyTorch; run them with ``handle.run``). A Flux or
            QwenImage combiner holding one ControlNet-Union runs it once per condition and
            fuses the conditions; a QwenImage combiner holding several ControlNets (which
            diffusers refuses) runs each on its condition.
        level: ``"residual"``: the models run as usual and their outputs are merged residual by
            residual. ``"block"``: the models run in lockstep, their hidden states are fused
            (unmerge) at the fusion points and their outputs merged.
        record: keep the winner map of every fusion in ``handle.records``.
        points: block level's fusion points: module names, :class:`FusionPoint` s, or a
            predicate ``(name, module) -> bool``. Needed for models of no known family;
            overrides a known family's points.
        global_pool: residuals with one site per sample (``[B, C, 1, 1]`` of global-pool
            ControlNets): ``"mean"`` (default) averages the nets taking part; ``"fuse"`` passes
            them to ``max_fuse`` (every normalised saliency is then 1 and the smallest index
            wins unless the vectors correlate).
        masks: regional masks, one entry per control model (per condition for a Flux or QwenImage
            ControlNet-Union run once per condition): ``None`` (everywhere) or an image-space mask,
            a PIL image (mode L / 1 / RGB..., scaled to [0, 1]), a numpy array or a tensor (floats
            in [0, 1], uint8 / 255, bool), ``[H, W]`` or ``[B, H, W]`` (one per image; the batch of
            the features must be a multiple of B, e.g. the two halves of classifier-free guidance
            get the same masks). Each is resized to the grid of every fusion with an area average
            (for the DiT families to the token grid) and acts as a per-site weight of its model's
            features (docs/spec.md): 0 removes the model there. At block level the
            fusions inside the nets take the masks as removal only (1 wherever the resized mask is >
            0) and the final merge as weights. Change them later with ``handle.set_masks``.
        process_group: sharded residuals: a ``torch.distributed`` process group (or a 1-D
            ``DeviceMesh``) over whose ranks the features every fusion sees are split, each
            rank holding a contiguous share of the tokens (sites) with the whole batch and
            all channels; the normalisers are summed over the ranks (``max_fuse``'s
            ``process_group``). Do NOT pass it when every rank computes the full residuals
            (diffusers' context parallelism as shipped: the ControlNets are not sharded): the
            sums would be P times too large. A Flux or QwenImage pipeline whose transformer
            has a context-parallel config needs no group: the combiner fuses the full residuals
            and returns each rank's share of the tokens. Not with ``masks``.
        **max_fuse_options: ``threshold``, ``preset``, ``correlation``, ``saliency``,
            ``normalize``, ``backend`` (and ``channel_dim`` for raw models) as in
            :func:`maxfusion_kernels.max_fuse`.

    Returns:
        A :class:`MaxFusionHandle` (a context manager; ``remove()`` undoes everything).

    Raises:
        AlreadyAppliedError: the target (or one of its models) is patched by a live handle.
        ValueError: bad options; block level on models of different architectures, or with a
            fusion point missing from a model.
        TypeError: a target of no known kind; a ``process_group`` that is not a process
            group.
        RuntimeError: a ``process_group`` while torch.distributed is not initialised.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
    if not isinstance(record, bool):
        raise TypeError(f"record must be a bool, got {type(record).__name__}")
    user_cd = max_fuse_options.get("channel_dim")

    combiner, handler = None, None
    if isinstance(target, (list, tuple)):
        models = list(target)
        bad = [type(m).__name__ for m in models if not isinstance(m, nn.Module)]
        if bad:
            raise TypeError(f"apply() got a list with non-modules: {bad}")
        if len(models) < 2:
            raise ValueError(f"apply() needs at least 2 models to fuse, got {len(models)}")
    elif find_combiner(target) is not None:
        combiner, handler = target, find_combiner(target)
    elif (found := _find_combiner_in(target)) is not None:
        combiner, handler = found
    else:
        hint = ""
        if isinstance(target, nn.Module):
            hint = " (a single model has nothing to fuse with: pass a list of models)"
        elif hasattr(target, "components"):
            hint = (" (this pipeline has no multi-condition combiner: build it with a list of "
                    "ControlNets / adapters)")
        raise TypeError(f"apply() cannot fuse a {type(target).__name__}{hint}")

    if combiner is not None:
        models = handler.nets(combiner)
    if len(models) > MAX_INPUTS:
        raise ValueError(f"MaxFusion fuses at most {MAX_INPUTS} models, got {len(models)}")
    distinct = list({id(m): m for m in models}.values())
    family = find_family(models[0]) if models else None
    if family is not None and any(find_family(m) is not family for m in models):
        family = None
    fixed_cd = handler.channel_dim if handler is not None else (
        family.channel_dim if family is not None else None)
    settings = make_settings(
        {k: v for k, v in max_fuse_options.items()}, channel_dim=user_cd,
        global_pool=global_pool, fixed_channel_dim=fixed_cd, process_group=process_group,
    )
    if masks is not None and settings.process_group is not None:
        raise ValueError(_MASKS_SHARDED)

    lock_points: list[FusionPoint] | None = None
    if level == "block":
        check_same_architecture(models)
        if points is not None:
            lock_points = resolve_points(models[0], points)
        elif family is not None:
            lock_points = family.points(models[0])
        else:
            raise ValueError(
                f"block level needs fusion points for {type(models[0]).__name__}: pass "
                "points=[module names] or a predicate (name, module) -> bool"
            )
        if not lock_points:
            raise ValueError("block level found no fusion point in the models")
        check_points(models, lock_points)
    elif points is not None:
        raise ValueError("points= is for level='block'")

    region = None
    if masks is not None:
        n_masks = len(models) if combiner is None or len(models) > 1 else None
        region = RegionMasks(image_masks(masks, n_masks))

    handle = MaxFusionHandle(level, settings, Recorder(enabled=record), models, handler,
                             combiner)
    handle._region = region
    if handler is not None and handler.shards_for_context_parallel and combiner is not target:
        handle._pipe = weakref.ref(target)  # the pipeline: look its transformer up per call
    claimed = ([combiner] if combiner is not None else []) + (
        distinct if level == "block" or combiner is None else [])
    try:
        handle._claim(claimed)
        if level == "block":
            handle._lockstep = Lockstep(
                models, lock_points, settings, handle._recorder, owner=handle,
                masks_for=lambda feats, nets: handle._masks_for(feats, nets, hard=True))
            handle._lockstep.install(handle._undo.append)
        if combiner is not None:
            handle._patch_forward(combiner, _combiner_forward(handle, handler, combiner))
    except BaseException:
        handle.remove()
        raise
    return handle


def _combiner_forward(handle: MaxFusionHandle, handler: CombinerHandler, combiner: nn.Module):
    # the class forward, bound to the instance (combiner.forward may be an accelerate hook's
    # wrapper, which calls the patched forward)
    original = types.MethodType(type(combiner).forward, combiner)
    signature = inspect.signature(original)

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        for p in signature.parameters.values():  # **kwargs of the signature, if any
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                a.update(a.pop(p.name, {}))
        jobs = handler.jobs(combiner, a)
        grid = handler.token_grid(combiner, a) if handle._region is not None else None
        out = handle._fused_call(jobs, handler.flatten, handler.pack,
                                 weights_apply=handler.scales_are_weights,
                                 nothing=handler.nothing, grid=grid)
        cpc = handle._replicated_cp()
        return out if cpc is None else handler.shard(out, cpc)

    forward.__wrapped__ = original  # inspect.signature(combiner.forward) stays the same
    forward.__doc__ = original.__doc__
    return forward
