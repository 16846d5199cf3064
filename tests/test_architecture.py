"""Imports run one way (README "Code map"), and the deployment module stands alone."""
import ast
import os
import shutil
import subprocess
import sys

from conftest import ROOT

# The project's modules, lowest first: each may import only modules before it.
LAYERS = ["tokenbridge", "deploy", "runs", "interop", "data", "quality", "training", "cuda_on_cpu",
          "export", "sample", "watch", "train", "evaluate", "reproduce", "benchmark", "rehearse"]


def project_imports(module):
    """The project modules that `module`.py imports anywhere in it, lazy imports included."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def test_every_project_module_is_in_a_layer():
    unplaced = {p.stem for p in ROOT.glob("*.py")} - set(LAYERS)
    assert not unplaced, f"place {unplaced} in LAYERS (and the README's code map)"


def test_imports_run_one_way():
    """Only downwards, so no cycle can form; a cycle names both modules."""
    wrong = [(m, other) for i, m in enumerate(LAYERS) if (ROOT / f"{m}.py").exists()
             for other in project_imports(m) if LAYERS.index(other) >= i]
    assert not wrong, f"imports against the layering (module, what it imports): {wrong}"


def test_deploy_runs_alone_without_torch(tmp_path, perturb):
    """A deployer copies deploy.py and the graphs folder, nothing else, into a place where torch
    cannot be imported, and samples."""
    import export
    import runs
    import tokenbridge as tb
    model = perturb(tb.TokenBridge(tb.TokenBridgeConfig.preset("tiny")).calibrate(
        __import__("torch").randn(8, 16, 8, 8)))
    run = tmp_path / "run"
    run.mkdir()
    checkpoint = {"config": model.config.to_dict(), "model": model.state_dict()}
    runs.atomic_save(checkpoint, run / runs.CHECKPOINT)
    export.export(str(run), str(tmp_path / "site" / "graphs"), verbose=False)
    shutil.copy(ROOT / "deploy.py", tmp_path / "site")
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'tokenbridge', 'runs', 'export', 'sample'):\n"
        "            raise ImportError(name + ' is not on a deployment machine')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from deploy import OnnxSampler\n"
        "tokens = OnnxSampler('graphs', 'cpu').sample_tokens([1, 2], num_iter=4, seed=0)\n"
        "print(tokens.shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "site", env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "(2, 64, 16)", proc.stderr[-2000:]
