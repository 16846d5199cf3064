"""The tools beside the four scripts, each run from the repository root as `python -m tools.NAME`:

    released   the released weights (and MAR's kl16) downloaded or converted into a run folder
    evaluate   FID, Inception Score, precision and recall of a samples .npz (ADM's reference)
    watch      a picture of decoding: positions step by step, one image channel by channel
    reproduce  the paper's tables and figures on the built-in digits
    benchmark  speed per decoding step and training step, and GPU memory per micro-batch
    rehearse   the real-size paths on a CPU: random weights, real commands, real kills
"""
