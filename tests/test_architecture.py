"""The house: the method and its four scripts at the root, the rest in lib/ and tools/; imports
run one way; the deployment module stands alone."""
import ast
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT

# What the root holds: the method, the torch-free deployment, the design card's three scripts.
ROOT_MODULES = {"tokenbridge", "deploy", "train", "sample", "export"}
FOLDERS = ("lib", "tools")


def listed(folder):
    """The modules a folder's __init__ docstring lists, in its order."""
    doc = ast.parse((ROOT / folder / "__init__.py").read_text()).body[0].value.value  # as written
    return [f"{folder}.{m}" for m in re.findall(r"^    (\w+)  ", doc, re.M)]


# The project's modules, lowest first: each may import only modules before it.
LAYERS = ["tokenbridge", "deploy", *listed("lib"), "export", "sample", "train", *listed("tools")]


def modules_in(folder):
    return {f"{folder}.{p.stem}" for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}


def project_imports(module):
    """The project modules that `module` imports anywhere in it, lazy imports included:
    `from lib import data` and `from lib.data import x` both count as lib.data."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names & set(LAYERS)


def test_the_root_holds_the_card_and_every_module_is_in_a_layer():
    at_root = {p.stem for p in ROOT.glob("*.py")}
    assert at_root == ROOT_MODULES, f"move {at_root - ROOT_MODULES} into lib/ or tools/"
    everything = ROOT_MODULES | modules_in("lib") | modules_in("tools")
    assert set(LAYERS) == everything, \
        f"list {everything - set(LAYERS)} in lib/__init__.py or tools/__init__.py"


def test_no_two_module_names_differ_by_a_suffix():
    stems = sorted({m.split(".")[-1] for m in LAYERS})
    alike = [(a, b) for a in stems for b in stems if a != b and b.startswith(a)]
    assert not alike, f"names that differ only by a suffix: {alike}"


def test_imports_run_one_way():
    """Only downwards, so no cycle can form; a cycle names both modules."""
    wrong = [(m, other) for i, m in enumerate(LAYERS)
             for other in project_imports(m) if LAYERS.index(other) >= i]
    assert not wrong, f"imports against the layering (module, what it imports): {wrong}"
    assert project_imports("deploy") == set(), "deploy.py imports nothing of the project"


def test_the_layering_check_finds_a_wrong_import(tmp_path, monkeypatch):
    """A module that imports one above it is reported (the check above can fail)."""
    fake_root = tmp_path / "repo"
    (fake_root / "lib").mkdir(parents=True)
    (fake_root / "lib" / "runs.py").write_text("from lib.validation import METRICS_FILE\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert project_imports("lib.runs") == {"lib.validation"}
    assert LAYERS.index("lib.validation") > LAYERS.index("lib.runs")


def test_deploy_runs_alone_without_torch(tmp_path, perturb):
    """A deployer copies deploy.py and the graphs folder, nothing else, into a place where torch
    cannot be imported, and samples."""
    import export
    import tokenbridge as tb
    from lib import runs
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
        "        if name.split('.')[0] in ('torch', 'tokenbridge', 'lib', 'tools', 'export'):\n"
        "            raise ImportError(name + ' is not on a deployment machine')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from deploy import OnnxSampler\n"
        "tokens = OnnxSampler('graphs', 'cpu').sample_tokens([1, 2], num_iter=4, seed=0)\n"
        "print(tokens.shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "site", env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "(2, 64, 16)", proc.stderr[-2000:]
