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


def to_device(obj, device: torch.device):
    """``obj`` (tensor or nested tuple / list / dict of them) with every tensor moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class _Record:
    """One submodule's output for one batch, with the version counters that reveal in-place edits."""

    __slots__ = ("output", "versions", "nbytes")

    def __init__(self, output):
        self.output = output
        tensors = _tensors(output)
        self.versions = [t._version for t in tensors]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def intact(self) -> bool:
        return [t._version for t in _tensors(self.output)] == self.versions


class BlockPasses:
    """Runs ``block`` on every batch of ``hidden`` (with the block's keyword arguments per batch size).

    ``linears``: block-relative names of the linears being quantized; the submodules containing one are
    the ones whose outputs are recorded and replayed. ``cache_bytes`` = 0 turns replay off.
    """

    def __init__(self, block: nn.Module, linears: Sequence[str], hidden: list[Tensor],
                 kwargs_by_size: dict[int, dict], device: torch.device, keep_on: torch.device,
                 cache_bytes: int):
        self.block, self.hidden, self.kwargs_by_size = block, hidden, kwargs_by_size
        self.device, self.keep_on, self.cache_bytes = device, keep_on, cache_bytes
        modules = dict(block.named_modules())
        self._modules = {name: modules[name] for name in modules
                         if name and any(lin == name or lin.startswith(name + ".") for lin in linears)}
        self._inside = {name: [n for n in self._modules if n.startswith(name + ".")] for name in self._modules}
        self._cache: dict[str, list[_Record]] = {}  # valid for the next pass: outermost finished submodules
        self._never: set[str] = set()  # submodules found unsafe to replay
        self._batch = 0

    @property
    def cached(self) -> list[str]:
        """Submodules whose outputs the next pass will replay."""
        return list(self._cache)

    def collect(self, inputs_of: Sequence[nn.Module], on_input: Sequence[Callable[[Tensor], None]], *,
                stop: bool) -> None:
        """One pass: call ``on_input[i](x)`` with the input of ``inputs_of[i]`` in every batch.

        ``stop=True`` (one module): the pass ends at that module's input and records finished submodules
        for the next pass; the caller may then change the weights of that module and later ones only.
        ``stop=False``: a full pass with no recording; replay is reset (the caller may change any weight).
        """
        if stop and len(inputs_of) != 1:
            raise ValueError("a stopping pass collects the input of exactly one module")

        def hook(fn, _module, args):
            fn(args[0])
            if stop:
                raise StopForward

        handles = [m.register_forward_pre_hook(functools.partial(hook, fn))
                   for m, fn in zip(inputs_of, on_input, strict=True)]
        try:
            self._run(record=stop, keep_outputs=False)
        finally:
            for h in handles:
                h.remove()
        if not stop:
            self._cache = {}

    def outputs(self) -> list[Tensor]:
        """The final pass: the block's outputs per batch (fp32, on ``keep_on``); replay ends with it."""
        outs = self._run(record=False, keep_outputs=True)
        self._cache = {}
        return outs

    def _run(self, *, record: bool, keep_outputs: bool) -> list[Tensor]:
        replay = dict(self._cache)
        skipped = {n for r in replay for n in self._inside[r]}  # never called: their parent is replayed
        watch = [n for n in self._modules if n not in replay and n not in skipped and n not in self._never]
        record = record and self.cache_bytes > 0
        new: dict[str, dict[int, _Record]] = {}
        bad: set[str] = set()
        outs: list[Tensor] = []
        with contextlib.ExitStack() as stack:
            for name, recs in replay.items():  # replayed submodules return their record for the batch
                stack.enter_context(override_forward(self._modules[name], functools.partial(self._replay, recs)))
            handles = [self._modules[n].register_forward_hook(functools.partial(self._record, n, new, bad))
                       for n in (watch if record else [])]
            try:
                for b, h in enumerate(self.hidden):
                    self._batch = b
                    try:
                        out = self.block(h.to(self.device), **self.kwargs_by_size[h.shape[0]])
                    except StopForward:
                        out = None
                    if keep_outputs:
                        out = out[0] if isinstance(out, (tuple, list)) else out
                        outs.append(out.float().to(self.keep_on))
                    bad.update(n for n, recs in new.items() if b in recs and not recs[b].intact())
                    bad.update(n for n, recs in replay.items() if not recs[b].intact())
                    if record and b == 0 and not self._fits(new, replay):
                        record = False  # too big to keep: this pass records nothing
                        for hd in handles:
                            hd.remove()
                        new.clear()
            finally:
                for hd in handles:
                    hd.remove()
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

    def _record(self, name: str, new: dict[str, dict[int, _Record]], bad: set[str], _module, _args, output):
        recs = new.setdefault(name, {})
        if self._batch in recs:  # called twice in one forward: one recorded output cannot stand for both
            bad.add(name)
            return
        recs[self._batch] = _Record(to_device(output, self.keep_on))
        for inner in self._inside[name]:  # the parent's output makes its children's records unnecessary
            new.get(inner, {}).pop(self._batch, None)

    def _fits(self, new: dict[str, dict[int, _Record]], replay: dict[str, list[_Record]]) -> bool:
        per_batch = sum(recs[0].nbytes for recs in new.values() if 0 in recs)
        held = sum(r.nbytes for recs in replay.values() for r in recs)
        return held + per_batch * len(self.hidden) <= self.cache_bytes
