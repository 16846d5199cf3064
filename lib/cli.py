"""The command line of every script: --help with each default once, --labels, output paths, and
the sampling settings a run folder holds. Imports no torch: sample.py runs ONNX without it."""
import argparse
import json
import os

import numpy as np

# In a run folder: the sampling settings its sweep found best (digit_metrics.sweep_sampling), which
# sample.py uses unless told otherwise.
SAMPLING_FILE = "sampling.json"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help gives each flag's default once: added where the help does not state it already and
    there is one to give (not None, not an unset switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if "default" in text or not shown or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parse_labels(text):
    """--labels "3,3,7" -> int64 array, or None when not given (the range is checked per model)."""
    if not text:
        return None
    try:
        return np.array([int(x) for x in text.split(",")], np.int64)
    except ValueError:
        raise ValueError("--labels must be comma-separated class numbers such as 3,3,7, "
                         f"got {text!r}") from None


def unwritable(path):
    """Why no file can be written at `path`, or None: the scripts check their outputs before
    any work."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist; create it or choose another path"
    if not os.access(folder, os.W_OK):
        return f"folder {folder} is not writable; choose another path"
    return None


def use_tuned(args):
    """--cfg, --temperature, --num-iter left out: the run's best, when its sweep found them
    (RUN/sampling.json), said in one line."""
    path = os.path.join(args.run or "", SAMPLING_FILE)
    if args.run and os.path.isfile(path):
        with open(path) as f:
            taken = {k: v for k, v in json.load(f).items()
                     if k in ("cfg", "temperature", "num_iter") and getattr(args, k) is None}
        vars(args).update(taken)
        if taken:
            said = ", ".join(f"{k} {v}" for k, v in taken.items())
            print(f"sampling as {path} says: {said} (flags override)")
