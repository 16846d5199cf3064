"""What the scripts share. train.py, sample.py, export.py and the tools import from here; nothing
here imports a script. Lowest first (each module imports only those above it):

    files          files written whole or not at all; .npy/.npz streamed in batches (no torch)
    cli            --help, --labels, output paths, a run's sampling settings (no torch)
    jobs           sampling jobs: batches shared by processes, resumable, locked (no torch)
    runs           a run folder: the one safe loader, the VAE, fingerprints
    official       the released weights and MAR's kl16, converted key by key
    data           digits, image folders, the VAE, the latent cache, calibration
    digit_metrics  sample quality on the digits: Fréchet distance, class accuracy, P/R
    distributed    torchrun's processes, devices and threads
    recipe         the paper's recipes and one accumulated, deterministic training step
    validation     a run's end: validation NLL, the digits' sampling sweep, a sample grid
    resume         checkpoints and exact resume
    cuda_on_cpu    tensors that carry a CUDA device without a GPU
    gpu_costs      what a step costs on a GPU, counted with cuda_on_cpu: memory, waits, kernels
"""
