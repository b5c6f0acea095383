"""Every fxpass module imports on its own, first, in a fresh process (an import circle
through a package ``__init__`` only shows when the import starts on the other side: vLLM's
worker processes import ``fxpass.runtime`` before anything else)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import fxpass


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(fxpass.__path__, "fxpass.")
                  if not m.name.endswith("__main__"))


def test_each_module_imports_first_in_a_fresh_process():
    # one interpreter with torch loaded, a forked child per module: fresh fxpass each time
    script = textwrap.dedent("""
        import importlib, os, sys, traceback
        import networkx, torch, torch.fx, transformers.modeling_utils  # noqa: F401, E401 - shared
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status:
                failed.append(name)
        print("FAILED", failed)
    """)
    modules = _modules()
    assert "fxpass.runtime.dispatch" in modules and "fxpass.trace.hierarchy" in modules
    proc = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("FAILED []"), proc.stdout + proc.stderr[-3000:]


def test_the_product_path_knows_no_model_table():
    """``fxpass.zoo`` (tiny towers and their inputs) serves the tests, the CLI's demo and the
    benchmarks: tracing, rewriting, the rules and vLLM's plugin decide from the graph alone,
    for any tower. Imports inside functions count."""
    import ast
    from pathlib import Path

    root = Path(fxpass.__file__).parent
    files = [*root.glob("trace/**/*.py"), *root.glob("rewrite/**/*.py"),
             *root.glob("rules/**/*.py"), *root.glob("parallel/**/*.py"),
             *root.glob("runtime/**/*.py"), root / "vllm_plugin.py", root / "warmup.py",
             root / "plugin_config.py", root / "weights.py"]
    assert len(files) > 20
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.relative_to(root)}:{node.lineno}" for n in names
                      if n == "fxpass.zoo" or n.startswith("fxpass.zoo.")]
    assert found == []
