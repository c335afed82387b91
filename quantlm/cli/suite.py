"""`quantlm suite`: placeholder until its issue lands (see `issues`)."""

from quantlm.errors import QuantlmError


def register(sub) -> None:
    p = sub.add_parser("suite", help="(not yet available)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    raise QuantlmError("`quantlm suite` is not implemented yet in this version")
