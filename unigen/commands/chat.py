"""``unigen chat --model PATH``: an interactive conversation in the terminal, with images.

``/image PATH`` attaches an image to the next message, ``/reset`` starts over, Ctrl-D (end of input) quits.
"""

from __future__ import annotations

import argparse
import sys

from unigen.commands._common import add_model_arguments, load_pipeline
from unigen.generation.sampling_options import finite_float, positive_int

HELP = "Talk with a model about images: /image PATH attaches an image, /reset starts over, Ctrl-D quits."
USAGE = "type a message; /image PATH attaches an image to your next message, /reset starts over, Ctrl-D quits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy (default), > 0 samples")


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    from unigen.errors import ArgumentError, DataError
    from unigen.generation.sampling_options import SamplingOptions
    from unigen.processor import load_image

    options = SamplingOptions(temperature=args.temperature)
    pipe = load_pipeline(args)
    print(USAGE, file=sys.stderr)
    messages: list[dict] = []
    images: list = []
    while (line := _read("you> ")) is not None:
        text = line.strip()
        if text == "/reset":
            messages, images = [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        command, *rest = text.split(maxsplit=1) or [""]
        if command == "/image":
            if not rest:
                print("error: /image needs a path, e.g. /image photo.png", file=sys.stderr)
                continue
            path = rest[0]
            try:
                images.append(load_image(path))  # read now, so a wrong path is named at once
            except (OSError, DataError) as err:
                print(f"error: {err}", file=sys.stderr)
                continue
            print(f"(image {path} attached to your next message)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"error: unknown command {text.split()[0]!r}; {USAGE}", file=sys.stderr)
            continue
        if not text and not images:
            continue
        turn = {"role": "user", "content": text, "images": images}
        try:
            reply = pipe.chat([*messages, turn], max_new_tokens=args.max_new_tokens, options=options)
        except ArgumentError as err:  # e.g. more images than tags: named, and the conversation goes on
            print(f"error: {err}", file=sys.stderr)
            continue
        messages += [turn, {"role": "assistant", "content": reply}]
        images = []
        print(f"assistant> {reply}", flush=True)
    return 0
