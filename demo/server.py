"""`splitleak demo`: the live attack demo in the browser.

Starts the cloud, the attacker's proxy and the device as processes (splitleak.demo.simulation), serves a dashboard
on http://127.0.0.1:PORT showing each frame the device sends, the activation the attacker intercepts, what each
attack reconstructs from it and how well, the cloud's answer and the latency, and lets the page change split point,
link, defence and attacks while everything runs. Ctrl-C stops it all.

The page is plain HTML, JavaScript and canvas from demo/static/, needing nothing from the internet. Updates reach it
as server-sent events, at most PAGE_RATE a second: a page that falls behind misses frames (never plot points), and
nothing waits for it, least of all the device. Changes go back as POST /control with a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from aiohttp import web

from splitleak import certs
from splitleak.core import data, defences, link, manifest
from splitleak.core.options import number
from splitleak.demo.simulation import Settings, Simulation

PAGE_RATE = 30  # updates a second, at most, to each page
STATUS_EVERY_S = 0.5  # with nothing new, the page still hears how the processes are, this often
STATIC = Path(__file__).resolve().parent / "static"
FACES_MODEL_DIR = manifest.FACES_MODEL_DIR
SIMULATION = web.AppKey("simulation", Simulation)
CLOSING = web.AppKey("closing", asyncio.Event)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def config(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIMULATION].config())


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIMULATION].status())


async def control(request: web.Request) -> web.Response:
    try:
        request.app[SIMULATION].control(await request.json())
    except ValueError as e:  # json.JSONDecodeError is one too
        return web.json_response({"error": str(e)}, status=400)
    return web.json_response({"ok": True})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one JSON message per update, {"frame", "points", "status"}."""
    simulation, closing = request.app[SIMULATION], request.app[CLOSING]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    version, point, last_sent = -1, 0, 0.0
    loop = asyncio.get_running_loop()
    while not closing.is_set():
        new_version, frame, points, point = simulation.updates(version, point)
        if new_version != version or points or loop.time() - last_sent > STATUS_EVERY_S:
            message = {"frame": frame, "points": points, "status": simulation.status()}
            try:
                await response.write(f"data: {json.dumps(message)}\n\n".encode())
            except ConnectionError:
                break  # the page has gone
            version, last_sent = new_version, loop.time()
        await asyncio.sleep(1 / PAGE_RATE)
    return response


def make_app(simulation: Simulation) -> web.Application:
    app = web.Application()
    app[SIMULATION] = simulation
    app[CLOSING] = asyncio.Event()
    app.router.add_get("/", index)
    app.router.add_get("/config", config)
    app.router.add_get("/status", status)
    app.router.add_get("/events", events)
    app.router.add_post("/control", control)
    app.router.add_static("/static/", STATIC)

    async def close_event_streams(app: web.Application) -> None:
        app[CLOSING].set()

    app.on_shutdown.append(close_event_streams)
    return app


async def serve(simulation: Simulation, host: str, port: int) -> None:
    """Serve the page until SIGINT or SIGTERM."""
    runner = web.AppRunner(make_app(simulation), access_log=None, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    port = runner.addresses[0][1]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"demo: open http://{host}:{port}/ in a browser (Ctrl-C stops the demo)", flush=True)
    await stop.wait()
    print("demo: stopping", file=sys.stderr, flush=True)
    await runner.cleanup()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="the page's port; 0 picks a free one")
    parser.add_argument(
        "--models",
        type=Path,
        help="an exported model folder, with its attacks/ (default: the shipped ResNet-20 on CIFAR-10)",
    )
    parser.add_argument("--dataset", help="the device's frames; default: cifar10 from the data root, else 'embedded'")
    parser.add_argument(
        "--faces",
        action="store_true",
        help="faces mode: the shipped ResNet-20 on AT&T faces, faces as frames (att_faces from the data root, else "
        "scikit-image's 'embedded-faces', which names no one), and the attacker's guess of who is in each picture",
    )
    parser.add_argument("--split", help="split point to start with (default: the model's default)")
    parser.add_argument("--link", default="loopback", choices=list(link.PROFILES), help="link profile to start with")
    parser.add_argument("--defence", default="none", choices=list(defences.DEFENCES), help="defence to start with")
    parser.add_argument("--strength", type=float, help="the defence's strength (see splitleak device --help)")
    parser.add_argument(
        "--fps", type=number(at_least=0), default=30.0, help="frames a second the device sends, at most; 0: no cap"
    )
    parser.add_argument(
        "--frames", type=number(int, at_least=1), default=500, help="distinct frames the device loops over"
    )
    parser.add_argument(
        "--tls",
        type=Path,
        metavar="DIR",
        help="mutual TLS between device and cloud, with the certificates in DIR (made there if it holds none): the "
        "proxy then sees only ciphertext and the attacks run at the curious cloud",
    )
    return parser


def faces_dataset() -> str:
    root = data.data_root()
    return "att_faces" if root is not None and (root / "att_faces" / "test.npz").exists() else "embedded-faces"


def main(args: argparse.Namespace) -> int:
    default_dataset = faces_dataset() if args.faces else data.default_dataset()
    settings = Settings(
        model_dir=args.models or (FACES_MODEL_DIR if args.faces else manifest.DEFAULT_MODEL_DIR),
        dataset=args.dataset or default_dataset,
        split=args.split,
        link=args.link,
        defence=args.defence,
        strength=args.strength,
        max_rate=args.fps,
        frames=args.frames,
        tls=certs.ensure(args.tls) if args.tls else None,
    )
    try:
        simulation = Simulation(settings)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"demo: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(f"demo: starting the cloud, the attacker's proxy and the device for {simulation.manifest.name}", flush=True)
    try:
        simulation.start()
        asyncio.run(serve(simulation, args.host, args.port))
    except (RuntimeError, OSError) as e:  # a process that did not start, a port in use
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        codes = simulation.stop()
        print("demo stopped: " + ", ".join(f"{role} {code}" for role, code in codes.items()), file=sys.stderr)
    return 0
