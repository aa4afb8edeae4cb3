"""Block level: N control models run in lockstep, their hidden states fused at module boundaries.

One file (over 400 lines) because the greenlet scheduler, the hooks that switch into it and its
fault handling share state that must change together.

Each model's forward runs in its own greenlet. A forward hook (or pre-hook) at a fusion point
switches to the scheduler with its tensors; when all N models have arrived at the same point,
the scheduler fuses (unmerge) and resumes each model with its own fused stream. Nothing of the
models' forward code is copied: the hooks sit on submodules and replace their outputs (or the
input of a module) the way any forward hook may.

Greenlets run in the caller's thread, so the caller's grad, inference and autocast modes hold in
every model. A model that changes one of those modes around a fusion point keeps its own: the
scheduler saves each model's modes when it switches out and restores them when it switches in.
Each model also runs in a copy of the caller's ``contextvars`` context (as a thread started with
``copy_context().run`` would).
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._fusion import FusionSettings, Recorder, unmerge

_AUTOCAST_DEVICES = ("cpu", "cuda")


class LockstepError(RuntimeError):
    """The control models of a block-level run did not reach the same fusion points."""


@dataclass(frozen=True)
class FusionPoint:
    """A place in a control model where the N models' hidden states are fused (unmerge).

    Args:
        module: qualified name of the submodule (as in ``model.named_modules()``).
        on: ``"output"`` (a forward hook replaces the module's output) or ``"input"`` (a forward
            pre-hook replaces one input of the module).
        leaf: ``on="output"``: ``None`` fuses every floating tensor in the output (tuples, lists
            and dicts are searched; a tensor that appears twice is fused once), an int fuses
            only ``output[leaf]``. ``on="input"``: the keyword name of the input (the first
            positional argument when it is not passed by keyword).
        inplace: ``on="input"`` only: write the fused stream into the input tensor in place,
            for inputs the model also keeps elsewhere (the ControlNet's first residual is the
            input of its first down block).
        emits: when a model's output is one of this point's fused streams, the final merge
            uses the features that entered this fusion (so naming the last module as a point
            does not fuse twice). Not for ``inplace`` points.
        name: the point's name in records (default: ``module``, ``module + ":input"``).
    """

    module: str
    on: str = "output"
    leaf: int | str | None = None
    inplace: bool = False
    emits: bool = True
    name: str | None = None

    def __post_init__(self):
        if self.on not in ("output", "input"):
            raise ValueError(f"FusionPoint.on must be 'output' or 'input', got {self.on!r}")
        if self.on == "input" and not isinstance(self.leaf, str):
            raise ValueError("an input FusionPoint needs leaf=<keyword name of the input>")
        if self.inplace and self.on != "input":
            raise ValueError("inplace=True is for input points only")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.module + (":input" if self.on == "input" else "")


# --------------------------------------------------------------------------------------------
# resolving points in a model
# --------------------------------------------------------------------------------------------


def resolve_points(model: nn.Module, points) -> list[FusionPoint]:
    """``points``: FusionPoints, module names, or a predicate ``(name, module) -> bool``."""
    if callable(points) and not isinstance(points, (FusionPoint, str)):
        names = [name for name, m in model.named_modules() if name and points(name, m)]
        if not names:
            raise ValueError("the fusion-point predicate selected no submodule")
        return [FusionPoint(name) for name in names]
    if isinstance(points, (str, FusionPoint)):
        points = [points]
    out = [p if isinstance(p, FusionPoint) else FusionPoint(str(p)) for p in points]
    if not out:
        raise ValueError("block level needs at least one fusion point")
    labels = [p.label for p in out]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise ValueError(f"fusion points named twice: {sorted(dup)}")
    return out


def check_points(models: Sequence[nn.Module], points: Sequence[FusionPoint]) -> None:
    for k, model in enumerate(models):
        for p in points:
            try:
                model.get_submodule(p.module)
            except AttributeError:
                raise ValueError(
                    f"fusion point {p.label!r}: model {k} ({type(model).__name__}) has no "
                    f"submodule {p.module!r}"
                ) from None


def _structure(model: nn.Module) -> tuple:
    config = getattr(model, "config", None)
    cfg = ()
    if isinstance(config, dict):
        cfg = tuple(sorted((k, repr(v)) for k, v in config.items() if not k.startswith("_")))
    return (
        type(model),
        tuple((n, type(m).__qualname__) for n, m in model.named_modules()),
        tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()),
        cfg,
    )


def check_same_architecture(models: Sequence[nn.Module]) -> None:
    """Raise ``ValueError`` naming the first difference unless all models share one
    architecture (class, module tree, parameter and buffer shapes and dtypes, public config)."""
    ref = _structure(models[0])
    what = ("class", "module tree", "parameters (names, shapes, dtypes)",
            "buffers (names, shapes, dtypes)", "config")
    for k, model in enumerate(models[1:], start=1):
        if model is models[0]:
            continue
        s = _structure(model)
        for part, a, b in zip(what, ref, s):
            if a != b:
                detail = ""
                if isinstance(a, tuple) and isinstance(b, tuple):
                    diff = [(x, y) for x, y in zip(a, b) if x != y][:1]
                    detail = (f": first difference {diff[0][0]!r} vs {diff[0][1]!r}" if diff
                              else f": {len(a)} vs {len(b)} entries")
                else:
                    detail = f": {a!r} vs {b!r}"
                raise ValueError(
                    f"block level needs control models of identical architecture; model {k} "
                    f"({type(model).__name__}) differs from model 0 ({type(models[0]).__name__}) "
                    f"in its {part}{detail}"
                )


# --------------------------------------------------------------------------------------------
# tensors in nested outputs
# --------------------------------------------------------------------------------------------


def _is_feature(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def collect_tensors(obj: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Floating tensors in ``obj`` (tensor, tuple, list, dict), each once, with their paths."""
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()

    def walk(o, p):
        if _is_feature(o):
            if id(o) not in seen:
                seen.add(id(o))
                found.append((p, o))
        elif isinstance(o, (tuple, list)):
            for i, x in enumerate(o):
                walk(x, f"{p}[{i}]")
        elif isinstance(o, dict):
            for key, x in o.items():
                walk(x, f"{p}[{key!r}]")

    walk(obj, path)
    return found


def replace_tensors(obj: Any, mapping: dict[int, torch.Tensor]) -> Any:
    """``obj`` with each tensor whose id is in ``mapping`` replaced (containers rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return mapping.get(id(obj), obj)
    if isinstance(obj, tuple):
        items = [replace_tensors(x, mapping) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return type(obj)(replace_tensors(x, mapping) for x in obj)
    if isinstance(obj, dict):
        items = {k: replace_tensors(v, mapping) for k, v in obj.items()}
        if hasattr(obj, "__dataclass_fields__"):  # diffusers BaseOutput
            return type(obj)(**items)
        try:
            return type(obj)(items)
        except TypeError:
            return items
    return obj


# --------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------


def _capture_modes() -> tuple:
    return (
        torch.is_inference_mode_enabled(),
        torch.is_grad_enabled(),
        tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
              for d in _AUTOCAST_DEVICES),
    )


@contextmanager
def _modes(state: tuple):
    """Enter the grad / inference / autocast modes ``state``; restore the current ones after."""
    inference, grad, autocast = state
    with ExitStack() as stack:
        if torch.is_inference_mode_enabled() != inference:
            stack.enter_context(torch.inference_mode(inference))
        prev_grad = torch.is_grad_enabled()
        if prev_grad != grad:
            torch.set_grad_enabled(grad)
            stack.callback(torch.set_grad_enabled, prev_grad)
        for dev, enabled, dtype in autocast:
            prev = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            if prev != (enabled, dtype):
                torch.set_autocast_enabled(dev, enabled)
                torch.set_autocast_dtype(dev, dtype)
                stack.callback(torch.set_autocast_dtype, dev, prev[1])
                stack.callback(torch.set_autocast_enabled, dev, prev[0])
        yield


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------


def _greenlet():
    try:
        import greenlet
    except ImportError as e:  # pragma: no cover - greenlet is in the diffusers extra
        raise ImportError(
            "block level needs the greenlet package: pip install greenlet "
            "(or pip install 'maxfusion[diffusers]')"
        ) from e
    return greenlet


@dataclass
class _Arrival:
    point: FusionPoint
    leaves: list[tuple[str, torch.Tensor]]


@dataclass
class _Finished:
    value: Any


class _Run:
    """One lockstep run: the scheduler greenlet and the features kept for emitted streams."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.origin: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def keep_origin(self, stream: torch.Tensor, original: torch.Tensor) -> None:
        key = id(stream)
        origin = self.origin

        def drop(_ref, key=key):
            origin.pop(key, None)

        origin[key] = (weakref.ref(stream, drop), original)

    def resolve(self, obj: Any) -> Any:
        """Outputs with every emitted stream replaced by the features that entered its fusion."""
        mapping = {}
        for _, t in collect_tensors(obj):
            entry = self.origin.get(id(t))
            if entry is not None and entry[0]() is t:
                mapping[id(t)] = entry[1]
        return replace_tensors(obj, mapping) if mapping else obj


class Lockstep:
    """Hooks at the fusion points of N models and the scheduler that runs them in lockstep."""

    def __init__(self, models: Sequence[nn.Module], points: Sequence[FusionPoint],
                 settings: FusionSettings, recorder: Recorder, owner: Any = None,
                 masks_for: Callable[[list[torch.Tensor], Sequence[int]], Any] | None = None):
        self.owner = owner  # the handle: kept alive by the hooks as long as they are installed
        # (features at a point, nets) -> the regional masks for max_fuse, or None
        self.masks_for = masks_for
        self.models = list(models)
        self.points = list(points)
        self.settings = settings
        self.recorder = recorder
        self._slots: dict[Any, tuple[_Run, int]] = {}  # greenlet -> (run, model index)

    # ---- hooks ----

    def install(self, add_undo: Callable[[Callable[[], None]], None]) -> None:
        """Register the hooks (once per distinct submodule; a model listed twice shares them)."""
        done: set[tuple[int, str]] = set()
        for model in self.models:
            for p in self.points:
                mod = model.get_submodule(p.module)
                key = (id(mod), p.label)
                if key in done:
                    continue
                done.add(key)
                if p.on == "output":
                    h = mod.register_forward_hook(self._output_hook(p), with_kwargs=True)
                else:
                    h = mod.register_forward_pre_hook(self._input_hook(p), with_kwargs=True)
                add_undo(h.remove)

    def _slot(self):
        if not self._slots:
            return None
        return self._slots.get(_greenlet().getcurrent())

    def _output_hook(self, point: FusionPoint):
        def hook(module, args, kwargs, output):
            slot = self._slot()
            if slot is None:  # not inside a lockstep run: the module behaves as before
                return None
            run, _ = slot
            if point.leaf is None:
                leaves = collect_tensors(output)
            else:
                t = output[point.leaf]
                if not _is_feature(t):
                    raise LockstepError(
                        f"fusion point {point.label!r}: output[{point.leaf!r}] is "
                        f"{type(t).__name__}, not a floating tensor"
                    )
                leaves = [(f"[{point.leaf}]", t)]
            if not leaves:
                raise LockstepError(f"fusion point {point.label!r}: the output has no tensor")
            fused = run.scheduler.switch(_Arrival(point, leaves))
            return replace_tensors(output, {id(t): g for (_, t), g in zip(leaves, fused)})

        return hook

    def _input_hook(self, point: FusionPoint):
        def hook(module, args, kwargs):
            slot = self._slot()
            if slot is None:
                return None
            run, _ = slot
            by_kw = point.leaf in kwargs
            t = kwargs[point.leaf] if by_kw else (args[0] if args else None)
            if not _is_feature(t):
                raise LockstepError(
                    f"fusion point {point.label!r}: input {point.leaf!r} is "
                    f"{type(t).__name__}, not a floating tensor"
                )
            src = t
            if point.inplace and t.requires_grad and torch.is_grad_enabled():
                # under autograd the fusion saves its inputs (by reference) for the backward,
                # and the in-place write below would change one: fuse a copy instead (the
                # graph then runs t -> copy -> fusion -> t, as the forward does)
                src = t.clone()
            (g,) = run.scheduler.switch(_Arrival(point, [("", src)]))
            if point.inplace:
                t.copy_(g)
                return None
            if by_kw:
                return args, {**kwargs, point.leaf: g}
            return (g, *args[1:]), kwargs

        return hook

    # ---- scheduler ----

    def run(self, calls: Sequence[Callable[[], Any]], nets: Sequence[int]) -> list[Any]:
        """Run ``calls`` (one forward per model, in the models' order) in lockstep.

        Returns their outputs, with emitted streams resolved (see :class:`FusionPoint`).
        Any exception in a model or in a fusion is raised here after every other model's
        greenlet has been unwound.
        """
        gl = _greenlet()
        run = _Run(gl.getcurrent())
        greenlets = [gl.greenlet(_finishing(call)) for call in calls]
        for g in greenlets:  # a new greenlet starts with an empty context: give it the caller's
            g.gr_context = contextvars.copy_context()
        for i, g in enumerate(greenlets):
            self._slots[g] = (run, i)
        modes = [_capture_modes()] * len(greenlets)
        sends: list[Any] = [None] * len(greenlets)
        started = False
        try:
            while True:
                msgs = []
                for i, g in enumerate(greenlets):
                    with _modes(modes[i]):
                        msg = g.switch(sends[i]) if started else g.switch()
                        modes[i] = _capture_modes()
                    msgs.append(msg)
                started = True
                if all(isinstance(m, _Finished) for m in msgs):
                    return [run.resolve(m.value) for m in msgs]
                self._check_round(msgs)
                sends = self._fuse_round(run, msgs, nets)
        finally:
            for g in greenlets:
                self._slots.pop(g, None)
            for i, g in enumerate(greenlets):
                if not g.dead:
                    with _modes(modes[i]):
                        try:
                            g.throw(gl.GreenletExit)
                        except BaseException:  # noqa: BLE001 - the first error is what we raise
                            pass

    @staticmethod
    def _where(msg) -> str:
        if isinstance(msg, _Finished):
            return "the end of its forward"
        return f"fusion point {msg.point.label!r}"

    def _check_round(self, msgs: list) -> None:
        first = msgs[0]
        for k, m in enumerate(msgs[1:], start=1):
            same = (
                isinstance(m, _Arrival) and isinstance(first, _Arrival)
                and m.point == first.point
                and [p for p, _ in m.leaves] == [p for p, _ in first.leaves]
            )
            if not same:
                detail = ""
                both = isinstance(m, _Arrival) and isinstance(first, _Arrival)
                if both and m.point == first.point:
                    detail = (f" with outputs {[p for p, _ in first.leaves]} vs "
                              f"{[p for p, _ in m.leaves]}")
                raise LockstepError(
                    "the control models reached different fusion points: model 0 is at "
                    f"{self._where(first)}, model {k} at {self._where(m)}{detail}; block level "
                    "needs models that run the same fusion points in the same order"
                )

    def _fuse_round(self, run: _Run, msgs: list[_Arrival], nets: Sequence[int]) -> list[list]:
        point = msgs[0].point
        n_leaves = len(msgs[0].leaves)
        streams: list[list[torch.Tensor]] = [[] for _ in msgs]
        for k in range(n_leaves):
            path = msgs[0].leaves[k][0]
            name = point.label + path  # path: "" for a tensor output, "[i]..." in a container
            feats = [m.leaves[k][1] for m in msgs]
            try:
                masks = self.masks_for(feats, nets) if self.masks_for is not None else None
                fused = unmerge(feats, settings=self.settings, name=name, nets=nets,
                                recorder=self.recorder, masks=masks)
            except (TypeError, ValueError) as e:
                raise LockstepError(f"at fusion point {name!r}: {e}") from e
            for i, g in enumerate(fused):
                if point.emits and not point.inplace:
                    run.keep_origin(g, feats[i])
                streams[i].append(g)
        return streams


def _finishing(call: Callable[[], Any]) -> Callable[[], _Finished]:
    def body():
        return _Finished(call())

    return body
