"""Caption images (or ask a question about them); the Python twin of `unigen caption`.

    python sample/caption.py --model demo_out/model/stage3/final demo_out/images/cap_000.png
"""

import argparse

import torch

from unigen import UniGenPipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True)
    p.add_argument("--question", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()

    pipe = UniGenPipeline.from_pretrained(args.model).to("cuda" if torch.cuda.is_available() else "cpu")
    for path, text in zip(args.images, pipe.caption(args.images, question=args.question,
                                                     max_new_tokens=args.max_new_tokens), strict=True):
        print(f"{path}\t{text}")


if __name__ == "__main__":
    main()
