"""Caption images (or ask a question about them); the Python twin of `unigen caption`.

    python sample/caption.py --model demo_out/model/stage3/final demo_out/images/cap_000.png
"""

import argparse

from unigen import UniGenPipeline
from unigen.generation.sampling_options import SamplingOptions, finite_float, positive_int
from unigen.runs import resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True)
    p.add_argument("--question", default=None)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=finite_float, default=None, help="0 or unset = greedy")
    args = p.parse_args()
    options = SamplingOptions(temperature=args.temperature)

    pipe = UniGenPipeline.from_pretrained(args.model).to(resolve_device("auto"))
    for path, text in zip(args.images, pipe.caption(args.images, question=args.question, options=options,
                                                     max_new_tokens=args.max_new_tokens), strict=True):
        print(f"{path}\t{text}")


if __name__ == "__main__":
    main()
