"""The training package stands on the library and the metrics library, never the harness."""

import pkgutil
import subprocess
import sys

import d9d.train


def test_training_imports_nothing_from_the_harness():
    modules = [f"d9d.train.{info.name}" for info in pkgutil.iter_modules(d9d.train.__path__)]
    assert "d9d.train.loop" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('d9d.profiling')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
