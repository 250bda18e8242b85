"""The `splitleak` console script: one subcommand per job, each defined in the module of its role.

Only the chosen subcommand's module is imported, so `splitleak device` never loads torch.
Every module named here has `get_args_parser() -> argparse.ArgumentParser` and `main(args) -> int`.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": ("splitleak.model.train", "train a zoo model on a data set and cache the checkpoint"),
    "export": ("splitleak.model.export", "write head and tail ONNX files for every split point, with a manifest"),
    "cloud": ("splitleak.cloud.server", "serve the tails over the Open Inference Protocol (gRPC)"),
    "device": ("splitleak.device.client", "run the head on frames with ONNX Runtime and stream them to the cloud"),
    "triton": ("splitleak.cloud.triton", "serve the tails on a stock NVIDIA Triton server (model repository, venv)"),
    "mlserver": ("splitleak.cloud.mlserver", "serve the tails on Seldon's MLServer (model repository, venv)"),
    "run": ("splitleak.run", "start a cloud and a device as two processes on loopback and print the summary"),
    "shadows": ("splitleak.model.shadows", "train shadow models on random halves of a pool, for membership inference"),
    "membership": ("splitleak.attacker.membership", "membership inference (LiRA, RMIA, loss) against shadow models"),
    "vantage": (
        "splitleak.attacker.vantage",
        "membership inference from a capture: the owner's audit, the app user, the tap",
    ),
    "canaries": ("splitleak.attacker.canaries", "plant noise canaries 1, 4 and 16 times in training; their exposure"),
    "extract": (
        "splitleak.attacker.split_extraction",
        "do data-free synthesis or class inversion copy training images?",
    ),
    "generators": ("splitleak.study.generators", "train a diffusion model or GAN; extract its training images back"),
    "attack": ("splitleak.attacker.replay", "invert the activations in a capture and score the reconstructions"),
    "attacker": ("splitleak.attacker.cli", "tap the channel between device and cloud (see splitleak attacker --help)"),
    "sweep": ("splitleak.study.cluster", "the latency-leakage-accuracy trade-off of every split, defence and link"),
    "loadtest": ("splitleak.study.loadtest", "many simulated devices against a cloud (or several): p50/p99, frames/s"),
    "recommend": ("splitleak.study.recommend", "the fastest split and defence within privacy and accuracy bounds"),
    "tls": ("splitleak.certs", "make a throwaway CA and certificates for mutual TLS between device and cloud"),
    "demo": ("splitleak.demo.server", "the live attack demo: cloud, proxy and device as processes, in the browser"),
}


# What a user's own input can make go wrong: a file that is missing, unreadable or not what it should be, a name or a
# value that does not exist or is out of range. Such an error ends the command with one line and exit 2, as argparse
# does for a bad option; anything else is a bug and keeps its traceback. SPLITLEAK_DEBUG=1 keeps it for these too.
USER_ERRORS = (OSError, ValueError, KeyError)


def one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split()) or type(error).__name__


def usage() -> str:
    lines = ["usage: splitleak COMMAND [options]   (splitleak COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"splitleak: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = module.get_args_parser()
    parser.prog = f"splitleak {argv[0]}"
    # A command that starts other commands (run, demo) takes their options too and passes them on as `forward`.
    args, forward = parser.parse_known_args(argv[1:])
    if forward and not getattr(module, "FORWARDS_OPTIONS", False):
        parser.error(f"unrecognized arguments: {' '.join(forward)}")
    args.forward = forward
    try:
        return module.main(args) or 0
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as e:
        if os.environ.get("SPLITLEAK_DEBUG"):
            raise
        print(f"splitleak {argv[0]}: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
