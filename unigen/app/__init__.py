"""``unigen app``: a Gradio web app over one :class:`~unigen.generation.pipeline.UniGenPipeline` (``pip install
unigen[app]``). ``requests`` holds what each request does, ``ui`` the page and its named endpoints,
``serve`` the web server."""

from unigen.app.requests import AppModel
from unigen.app.serve import RunningApp, serve, start
from unigen.app.ui import build_app

__all__ = ["AppModel", "RunningApp", "build_app", "serve", "start"]
