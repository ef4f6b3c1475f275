"""Start the app's web server on a host and port: on this machine only by default, never through a public
share link, with no analytics or other calls out (the page's fonts ship with Gradio)."""

from __future__ import annotations

import socket

import gradio as gr

ANY_PORT = 0
PORT_TRIES = 5  # a free port picked by the OS can be taken by another process before the server binds it


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
