"""Forward passes of one decoder block over all calibration batches, reusing what earlier passes computed.

True-sequential GPTQ runs a block once per sequential group, each pass stopping at the group's input (the
group is quantized between passes), then once more for the block's outputs. Run naively, that is about
2.7 full forwards per block for LLaMA. Here a pass records the output of every submodule that contains a
block linear and finished before the stop (e.g. q/k/v in the pass for o_proj, the whole attention in the
pass for gate/up, gate/up in the pass for down_proj); the next pass replays those outputs instead of
recomputing them. That is exact, not an approximation: a submodule that finished before the stop used
no weight quantized since (the stop is at the first linear of the group about to be quantized, and the
groups run in forward order) and its inputs are computed the same way, so it would return the same
values. Only the outermost finished submodules are kept (the attention's output, not also q/k/v).

Tails: when a submodule returns the output tensor of the group's first linear as its only tensor (LLaMA:
the attention returns o_proj's output, the MLP down_proj's), the pass for that group does not stop at
the linear: the linear returns a placeholder (no product), the submodule finishes, and the pass stops
there, recording the submodule's output with a slot for the linear's output and the linear's input.
The next pass fills the slot with the linear applied to that input, now with its quantized weights, so
the attention is computed once per block, not twice. Which submodules end in which linear is learned
by watching the passes (tensor identity), so the first block runs without tails; a tail that does not
hold when used is dropped.

Safety checks, each making a submodule fall back to recomputation: it ran zero or several times in a
batch, or a recorded tensor was modified in place afterwards (its version counter moved). Records live on
``keep_on``; they are kept only if all of them fit in ``cache_bytes`` (projected from the first batch),
otherwise the pass recomputes as before. Submodules without block linears (norms, activations) are cheap
and always recomputed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from quantlm.gptq.cpu_linear import override_forward


class StopForward(Exception):
    """Raised by a hook once it has what it needs, so the rest of the forward pass is skipped."""


def _tensors(obj) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def map_tensors(obj, fn):
    """``obj`` (tensor or nested tuple / list / dict of them) with every tensor replaced by ``fn(tensor)``."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj, device: torch.device):
    """``obj`` (tensor or nested tuple / list / dict of them) with every tensor moved to ``device``."""
    return map_tensors(obj, lambda t: t.to(device))


_SLOT = object()  # where a tail record's linear output goes


def _replace(obj, old, new):
    """``obj`` (nested tuple / list / dict) with the element that ``is old`` replaced by ``new``."""
    if obj is old:
        return new
    if isinstance(obj, tuple):
        return tuple(_replace(o, old, new) for o in obj)
    if isinstance(obj, list):
        return [_replace(o, old, new) for o in obj]
    if isinstance(obj, dict):
        return {k: _replace(v, old, new) for k, v in obj.items()}
    return obj


class _Record:
    """One submodule's output for one batch, with the version counters that reveal in-place edits.

    A tail record holds the output with ``_SLOT`` in place of ``linear``'s output, and that linear's
    input; ``output`` computes the slot (once) with the linear's current weights.
    """

    __slots__ = ("_output", "versions", "nbytes", "tail")

    def __init__(self, output, tail: tuple[nn.Module, _Record] | None = None):
        self._output, self.tail = output, tail
        tensors = _tensors(output)
        self.versions = [t._version for t in tensors]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors) + (tail[1].nbytes if tail else 0)

    @property
    def output(self):
        if self.tail is not None:
            linear, x = self.tail
            y = linear(x.output.to(linear.weight.device)).to(x.output.device)
            self._output, self.tail = _replace(self._output, _SLOT, y), None
            self.versions = [t._version for t in _tensors(self._output)]
        return self._output

    def intact(self) -> bool:
        return ([t._version for t in _tensors(self._output)] == self.versions
                and (self.tail is None or self.tail[1].intact()))


class BlockPasses:
    """Runs ``block`` on every batch of ``hidden`` (with the block's keyword arguments per batch size).

    ``hidden``: the batches, a list of tensors or any sized iterable of them (e.g. ``offload.HiddenStates``,
    which reads them from the device, pinned host memory or disk). ``linears``: block-relative names of
    the linears being quantized; the submodules containing one are the ones whose outputs are recorded
    and replayed. ``cache_bytes`` = 0 turns replay off. ``tails``:
    submodule -> the linear whose output it returns, as learned by an earlier block's passes (``tails``
    after the passes holds what this block taught).
    """

    def __init__(self, block: nn.Module, linears: Sequence[str], hidden: Sequence[Tensor],
                 kwargs_by_size: dict[int, dict], device: torch.device, keep_on: torch.device,
                 cache_bytes: int, tails: dict[str, str] | None = None):
        self.block, self.hidden, self.kwargs_by_size = block, hidden, kwargs_by_size
        self.device, self.keep_on, self.cache_bytes = device, keep_on, cache_bytes
        modules = dict(block.named_modules())
        self._modules = {name: modules[name] for name in modules
                         if name and any(lin == name or lin.startswith(name + ".") for lin in linears)}
        self._linears = [name for name in linears if name in modules]
        self._name_of = {id(m): name for name, m in self._modules.items()}
        self._inside = {name: [n for n in self._modules if n.startswith(name + ".")] for name in self._modules}
        self.tails = {p: lin for p, lin in (tails or {}).items() if p in self._modules and lin in self._inside[p]}
        self._cache: dict[str, list[_Record]] = {}  # valid for the next pass: outermost finished submodules
        self._never: set[str] = set()  # submodules found unsafe to replay
        self._batch = 0
        self._late = False  # past a tail pass's linear in this batch: nothing more may be recorded
        self._recording = False
        self._slot: Tensor | None = None
        self._tail_input: Tensor | None = None

    @property
    def cached(self) -> list[str]:
        """Submodules whose outputs the next pass will replay."""
        return list(self._cache)

    def collect(self, inputs_of: Sequence[nn.Module], on_input: Sequence[Callable[[Tensor], None]], *,
                stop: bool) -> None:
        """One pass: call ``on_input[i](x)`` with the input of ``inputs_of[i]`` in every batch.

        ``stop=True`` (one module): the pass ends at that module's input (or, for a tail, where the
        submodule ending in it finishes) and records finished submodules for the next pass; the caller
        may then change the weights of that module and later ones only. ``stop=False``: a full pass with
        no recording; replay is reset (the caller may change any weight).
        """
        if stop and len(inputs_of) != 1:
            raise ValueError("a stopping pass collects the input of exactly one module")
        tail = self._tail_of(inputs_of[0]) if stop and self.cache_bytes > 0 else None

        def hook(fn, _module, args):
            fn(args[0])
            if stop and tail is None:
                raise StopForward

        handles = [m.register_forward_pre_hook(functools.partial(hook, fn))
                   for m, fn in zip(inputs_of, on_input, strict=True)]
        try:
            self._run(record=stop, keep_outputs=False, tail=tail)
        finally:
            for h in handles:
                h.remove()
        if not stop:
            self._cache = {}

    def outputs(self, sink: Callable[[int, Tensor], None] | None = None) -> list[Tensor]:
        """The final pass: the block's outputs per batch; replay ends with it. Without ``sink`` they are
        returned (fp32, on ``keep_on``); with it, ``sink(b, output)`` gets each batch as it is computed
        (on the compute device, in the forward dtype) and nothing is returned."""
        outs = self._run(record=False, keep_outputs=True, sink=sink)
        self._cache = {}
        return outs

    def _tail_of(self, linear: nn.Module) -> str | None:
        """The outermost submodule known to end in ``linear`` (its output is the submodule's output)."""
        name = self._name_of.get(id(linear))
        if not isinstance(linear, nn.Linear) or name is None:
            return None
        parents = [p for p, lin in self.tails.items() if lin == name and p not in self._never and p not in self._cache]
        return min(parents, key=len) if parents else None

    def _run(self, *, record: bool, keep_outputs: bool, tail: str | None = None,
             sink: Callable[[int, Tensor], None] | None = None) -> list[Tensor]:
        replay = dict(self._cache)
        skipped = {n for r in replay for n in self._inside[r]}  # never called: their parent is replayed
        running = [n for n in self._modules if n not in replay and n not in skipped]
        self._recording = record = record and self.cache_bytes > 0
        new: dict[str, dict[int, _Record]] = {}
        bad: set[str] = set()
        outs: list[Tensor] = []
        seen: dict[str, Tensor] = {}  # during batch 0 only: linear -> its output, to learn tails
        with contextlib.ExitStack() as stack:
            for name, recs in replay.items():  # replayed submodules return their record for the batch
                stack.enter_context(override_forward(self._modules[name], functools.partial(self._replay, recs)))
            handles = [self._modules[n].register_forward_hook(functools.partial(self._learn, n, seen))
                       for n in running]
            if record:
                handles += [self._modules[n].register_forward_hook(functools.partial(self._record, n, new, bad))
                            for n in running if n not in self._never and n != tail]
            if tail is not None:
                linear = self._modules[self.tails[tail]]
                stack.enter_context(override_forward(linear, functools.partial(self._placeholder, linear)))
                handles.append(linear.register_forward_pre_hook(self._enter_tail))
                handles.append(self._modules[tail].register_forward_hook(
                    functools.partial(self._finish_tail, tail, linear, new, bad)))
            try:
                for b, h in enumerate(self.hidden):
                    self._batch, self._late, self._tail_input = b, False, None
                    try:
                        out = self.block(h.to(self.device), **self.kwargs_by_size[h.shape[0]])
                    except StopForward:
                        out = None
                    seen.clear()  # batch 0's linear outputs: learned from, not to be held through the pass
                    if keep_outputs:
                        out = out[0] if isinstance(out, (tuple, list)) else out
                        if sink is not None:
                            sink(b, out)
                        else:
                            outs.append(out.float().to(self.keep_on))
                        del out
                    bad.update(n for n, recs in new.items() if b in recs and not recs[b].intact())
                    bad.update(n for n, recs in replay.items() if not recs[b].intact())
                    if record and b == 0 and not self._fits(new, replay):
                        self._recording = record = False  # too big to keep: this pass records nothing
                        new.clear()
            finally:
                for hd in handles:
                    hd.remove()
                self._tail_input = None
        self._never |= bad
        n = len(self.hidden)
        complete = {name: [recs[b] for b in range(n)] for name, recs in new.items()
                    if name not in bad and len(recs) == n} if record else {}
        kept = {**{k: v for k, v in replay.items() if k not in bad}, **complete}
        # only the outermost: a kept submodule inside another kept one is never called again
        self._cache = {k: v for k, v in kept.items() if not any(k.startswith(o + ".") for o in kept)}
        return outs

    def _replay(self, recs: list[_Record], *_args, **_kwargs):
        return recs[self._batch].output

    def _learn(self, name: str, seen: dict[str, Tensor], _module, _args, output):
        """Batch 0: note linear outputs; a submodule whose only tensor output is one of them ends in it."""
        if self._batch != 0:
            return
        if name in self._linears and isinstance(output, Tensor):
            seen[name] = output
        tensors = _tensors(output)
        for lin in self._inside[name]:
            if len(tensors) == 1 and seen.get(lin) is tensors[0]:
                self.tails[name] = lin

    def _record(self, name: str, new: dict[str, dict[int, _Record]], bad: set[str], _module, _args, output):
        if self._late or not self._recording:  # after a tail placeholder: computed from it, worthless
            return
        recs = new.setdefault(name, {})
        if self._batch in recs:  # called twice in one forward: one recorded output cannot stand for both
            bad.add(name)
            return
        self._keep(name, new, _Record(to_device(output, self.keep_on)))

    def _keep(self, name: str, new: dict[str, dict[int, _Record]], record: _Record) -> None:
        new.setdefault(name, {})[self._batch] = record
        for inner in self._inside[name]:  # the parent's output makes its children's records unnecessary
            new.get(inner, {}).pop(self._batch, None)

    def _enter_tail(self, _module, args):
        self._late, self._tail_input = True, args[0]

    def _placeholder(self, linear: nn.Linear, x: Tensor) -> Tensor:
        self._slot = torch.zeros(*x.shape[:-1], linear.weight.shape[0], dtype=x.dtype, device=x.device)
        return self._slot

    def _finish_tail(self, name: str, linear: nn.Module, new: dict[str, dict[int, _Record]], bad: set[str],
                     _module, _args, output):
        """The tail submodule finished: record its output around the placeholder, then end the pass."""
        tensors = _tensors(output)
        if not self._recording:
            pass
        elif len(tensors) == 1 and tensors[0] is self._slot and self._tail_input is not None:
            x = _Record(to_device(self._tail_input, self.keep_on))
            self._keep(name, new, _Record(_replace(output, self._slot, _SLOT), tail=(linear, x)))
        else:  # the submodule does not end in the linear after all: recompute it next pass
            bad.add(name)
            self.tails.pop(name, None)
        self._slot = None
        raise StopForward

    def _fits(self, new: dict[str, dict[int, _Record]], replay: dict[str, list[_Record]]) -> bool:
        per_batch = sum(recs[0].nbytes for recs in new.values() if 0 in recs)
        held = sum(r.nbytes for recs in replay.values() for r in recs)
        return held + per_batch * len(self.hidden) <= self.cache_bytes
