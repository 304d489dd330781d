"""The package's layering, checked from the source: no import cycles, and the library never imports the CLI.

Every ``import`` / ``from ... import`` statement of every module under ``stablesr/`` counts, including the ones inside
functions (a lazy import is still a dependency; it only hides a cycle until the function runs). ``stablesr/cli/`` is
the command-line layer: it may import the library, never the reverse.
"""

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "stablesr"
CLI_PACKAGE = "stablesr.cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the stablesr modules it imports (explicitly named; a ``from pkg import sub`` counts sub too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                # the longest known module that the name refers to (``stablesr.models.cfw.CFWAdapter`` -> the file)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _is_cli(module: str) -> bool:
    return module == CLI_PACKAGE or module.startswith(CLI_PACKAGE + ".")


def test_the_checker_sees_cycles_and_layering():
    """The checks below can fail: a made-up graph with a cycle and a library -> CLI edge is caught."""
    graph = {"stablesr.a": {"stablesr.b"}, "stablesr.b": {"stablesr.a", "stablesr.cli.x"}, "stablesr.cli.x": set()}
    assert find_cycles(graph) == [["stablesr.a", "stablesr.b"]]
    assert [m for m, deps in graph.items() if not _is_cli(m) and any(_is_cli(d) for d in deps)] == ["stablesr.b"]
    assert _resolve("stablesr.pipelines.pipeline_stablesr", False, 2, "models.cfw") == "stablesr.models.cfw"
    assert _resolve("stablesr.cli", True, 1, "common") == "stablesr.cli.common"


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20 and "stablesr.pipelines.pipeline_stablesr" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_library_never_imports_the_command_line():
    graph = import_graph()
    offenders = {
        module: sorted(d for d in deps if _is_cli(d))
        for module, deps in graph.items()
        if not _is_cli(module) and module != "stablesr.__main__" and any(_is_cli(d) for d in deps)
    }
    assert not offenders, f"library modules importing the CLI layer: {offenders}"


def test_build_app_needs_no_cli(small_pipeline_dir):
    """The web UI is built from Python with the library alone (a fresh interpreter; gradio stays optional)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from stablesr.loading import load_pipeline\n"
        "from stablesr.webui import build_app\n"
        f"pipe = load_pipeline({str(small_pipeline_dir)!r}, device='cpu')\n"
        "try:\n"
        "    import gradio  # noqa: F401\n"
        "except ImportError:\n"
        "    gradio = None\n"
        "if gradio is not None:\n"
        "    demo = build_app(pipe)\n"
        "    assert demo.stablesr_tmpdir.is_dir()\n"
        "assert not [m for m in sys.modules if m == 'stablesr.cli' or m.startswith('stablesr.cli.')], "
        "sorted(m for m in sys.modules if m.startswith('stablesr.cli'))\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_folder_saved_with_the_old_module_paths_loads(small_pipeline_dir, tmp_path):
    """Folders written before the restructuring name ``stablesr.schedulers`` (now a package) in model_index.json.

    ``tests/fixtures/model_index_0.1.0.json`` is the file the 0.1.0 layout wrote for a converted model. A copy of a
    current folder with that file loads in a fresh interpreter and restores exactly like the current folder.
    """
    import shutil
    import subprocess
    import sys

    old = tmp_path / "old-layout"
    shutil.copytree(small_pipeline_dir, old)
    fixture = Path(__file__).parent / "fixtures" / "model_index_0.1.0.json"
    shutil.copy(fixture, old / "model_index.json")
    assert '"stablesr.schedulers",' in (old / "model_index.json").read_text()
    code = (
        "import sys, torch\n"
        "from PIL import Image\n"
        "import numpy as np\n"
        "from stablesr import StableSRPipeline\n"
        "image = Image.fromarray((np.arange(32 * 40 * 3) % 251).astype(np.uint8).reshape(32, 40, 3))\n"
        "outs = []\n"
        "for folder in sys.argv[1:]:\n"
        "    pipe = StableSRPipeline.from_pretrained(folder)\n"
        "    outs.append(pipe(image, upscale=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),\n"
        "                     output_type='np').images)\n"
        "    print(type(pipe.scheduler).__module__, type(pipe.scheduler).__name__)\n"
        "assert np.array_equal(outs[0], outs[1])\n"
        "print('equal')\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(old), str(small_pipeline_dir)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.split("\n")
    assert lines[0] == "stablesr.schedulers.scheduling_stablesr_ddpm StableSRDDPMScheduler", run.stdout
    assert lines[-2] == "equal"
