"""Turn the released TokenBridge weights (and MAR's kl16 VAE) into a run folder.

    python -m tools.released --download large     # fetch both by their published names, convert
    python -m tools.released --official checkpoint-last.pth --preset large --vae kl16.ckpt \\
        --out runs/large

The converters live in lib/official.py; sample.py and export.py take --official too."""
import argparse
import sys

import tokenbridge as tb
from lib.cli import DefaultsHelpFormatter
from lib.official import RELEASED_SIZES, download_official, import_official


def main(args):
    if args.download:
        if args.preset not in (None, args.download):
            raise ValueError(f"--download {args.download} names the model size; drop --preset")
        download_official(args.download, args.vae, args.out)
    else:
        import_official(args.official, args.preset or "large", args.vae, args.out)


def get_parser():
    parser = argparse.ArgumentParser(
        description="Convert released TokenBridge weights (and kl16) into a run folder.",
        formatter_class=DefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--official", help="official checkpoint-last.pth, a local file")
    source.add_argument("--download", choices=RELEASED_SIZES,
                        help="fetch the released checkpoint of this size (and kl16, unless --vae) "
                             "from its published home, then convert it")
    parser.add_argument("--preset", choices=sorted(tb.PRESETS),
                        help="the model size of --official (default large; the released ones: "
                             "large, huge)")
    parser.add_argument("--vae",
                        help="MAR's kl16.ckpt (LDM layout), converted to a diffusers AutoencoderKL")
    parser.add_argument("--out", help="run folder to write (default runs/official-PRESET)")
    return parser


if __name__ == "__main__":
    try:
        main(get_parser().parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
