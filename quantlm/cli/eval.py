"""`quantlm eval`: placeholder until its issue lands (see `issues`)."""

from quantlm.errors import QuantlmError


def register(sub) -> None:
    p = sub.add_parser("eval", help="(not yet available)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    raise QuantlmError("`quantlm eval` is not implemented yet in this version")
