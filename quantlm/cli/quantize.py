"""`quantlm quantize`: placeholder until its issue lands (see `issues`)."""

from quantlm.errors import QuantlmError


def register(sub) -> None:
    p = sub.add_parser("quantize", help="(not yet available)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    raise QuantlmError("`quantlm quantize` is not implemented yet in this version")
