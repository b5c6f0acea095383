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
