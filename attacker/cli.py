"""`splitleak attacker TOOL`: the attacker's tools, one module each, like the top-level commands.

Only the chosen tool's module is imported, so tapping the channel (`proxy`) never loads torch, which the attacks need.
Every module named here has `get_args_parser() -> argparse.ArgumentParser` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib

TOOLS = {
    "proxy": ("splitleak.attacker.proxy", "man in the middle: forward device <-> cloud and capture every activation"),
    "train-decoder": (
        "splitleak.attacker.train_decoder",
        "train an exportable attack (the decoder by default) for a model's split points and export it to ONNX",
    ),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tools:\n" + "\n".join(f"  {name:<10} {about}" for name, (_, about) in TOOLS.items()),
    )
    parser.add_argument("tool", choices=list(TOOLS), help="splitleak attacker TOOL --help for its options")
    # The tool's own parser reads these, so that a tool's module is imported only when it is the one asked for.
    parser.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> int:
    module = importlib.import_module(TOOLS[args.tool][0])
    parser = module.get_args_parser()
    parser.prog = f"splitleak attacker {args.tool}"
    return module.main(parser.parse_args(args.options)) or 0
