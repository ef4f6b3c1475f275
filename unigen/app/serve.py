"""Start the app's web server on a host and port: on this machine only by default, never through a public
share link, with no analytics or other calls out (the page's fonts ship with Gradio)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import gradio as gr

from unigen.app.requests import AppModel
from unigen.app.ui import build_app
from unigen.generation.pipeline import UniGenPipeline

ANY_PORT = 0
PORT_TRIES = 5  # a free port picked by the OS can be taken by another process before the server binds it


@dataclass
class RunningApp:
    url: str
    app: gr.Blocks
    model: AppModel

    def close(self) -> None:
        self.app.close(verbose=False)
        self.model.close()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_address(host: str, port: int) -> None:
    """Raise OSError when ``host:port`` cannot be served (taken, or not this machine's address): checked before
    a model load that can take minutes. The server's own bind still decides; this only answers early."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed one's port is free
        s.bind((host, port))


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860) -> str:
    """Serve ``app`` in background threads and return its URL; ``port`` 0 picks a free one."""
    tries = PORT_TRIES if port == ANY_PORT else 1
    for attempt in range(tries):
        try:
            app.launch(server_name=host, server_port=free_port(host) if port == ANY_PORT else port, share=False,
                       prevent_thread_lock=True, ssr_mode=False, quiet=True, show_error=False,
                       footer_links=["api"], max_file_size="20mb", mcp_server=False)
            return app.local_url
        except OSError:
            if attempt == tries - 1:
                raise


def start(pipe: UniGenPipeline, name: str, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 1,
          max_queue: int = 64) -> RunningApp:
    """The app over ``pipe`` (shown as ``name``), serving in background threads until ``close()``."""
    model = AppModel(pipe, name)
    app = build_app(model, concurrency=concurrency, max_queue=max_queue)
    try:
        return RunningApp(serve(app, host, port), app, model)
    except BaseException:
        model.close()
        raise
