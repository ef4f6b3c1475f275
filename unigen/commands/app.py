"""``unigen app``: the web app (Gradio) in a browser: generate, understand / chat, about the model."""

from __future__ import annotations

import argparse
import os

from unigen.commands._common import DTYPES, add_quantize_arguments, load_pipeline, sigterm_as_interrupt
from unigen.generation.sampling_options import positive_int
from unigen.recipes import resolve

HELP = "Serve a web app (Gradio) to generate images and ask about images in a browser (pip install unigen[app])."
DEFAULT_MODEL = "checkpoints/shapes-small"


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in [0, 65535] (0 = any free port), got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, type=resolve,
                   help=f"checkpoint directory (any layout unigen loads) or hub id (default {DEFAULT_MODEL}, "
                        "the shipped Shapes model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                        "network). The app never makes a public share link")
    p.add_argument("--port", type=port_number, default=7860, help="port (default 7860; 0 = any free port)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="where to run: auto picks cuda, then mps, then cpu (default auto)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    add_quantize_arguments(p)
    p.add_argument("--concurrency", type=positive_int, default=1,
                   help="model requests that run at once over all sessions; the rest wait in a queue "
                        "(default 1: a request already uses every core)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests that may wait; more are refused with a message (default 64)")


def run(args: argparse.Namespace) -> int:
    from unigen.errors import ArgumentError, UniGenError

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no calls out
    try:
        from unigen.app import start
        from unigen.app.serve import check_address
    except ImportError as err:
        raise UniGenError(f"the app needs Gradio ({err}); install it with: pip install 'unigen[app]'") from err
    def cannot_serve(err: OSError) -> ArgumentError:
        reason = str(err).split(". ")[0]  # Gradio's advice after it names launch() arguments, not flags
        return ArgumentError(f"cannot serve on {args.host}:{args.port} ({reason}); pass another --port (0: any free "
                             "one), or a --host address of this machine")

    try:
        check_address(args.host, args.port)  # before the model load, which can take minutes
    except OSError as err:
        raise cannot_serve(err) from err
    pipe = load_pipeline(args)
    with sigterm_as_interrupt():  # from the moment the app has temp folders to remove
        try:
            running = start(pipe, str(args.model), args.host, args.port, args.concurrency, args.max_queue)
        except OSError as err:
            raise cannot_serve(err) from err
        print(f"unigen app: {running.url} (Ctrl+C stops it)", flush=True)
        try:
            running.app.block_thread()  # returns on Ctrl-C, and on SIGTERM
        finally:
            running.close()  # the server, Gradio's cache of this app and the download folder
    return 0
