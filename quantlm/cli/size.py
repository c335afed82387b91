"""`quantlm size`: placeholder replaced below."""


def register(sub) -> None:
    p = sub.add_parser("size", help="model sizes in bits")
    p.set_defaults(func=lambda a: 0)
