"""The public API: every name in ``__all__`` imports; the core imports no diffusers/peft/accelerate."""

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["shortcutfm", "shortcutfm.core", "shortcutfm.models", "shortcutfm.data", "shortcutfm.models.diffusers",
            "shortcutfm.preparation"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_imports(name):
    module = importlib.import_module(name)
    assert module.__all__, f"{name} has an empty __all__"
    for public in module.__all__:
        assert getattr(module, public) is not None, f"{name}.{public}"


def test_core_imports_no_heavy_libraries():
    code = (
        "import sys, shortcutfm.core, shortcutfm.core.targets;"
        "bad = [m for m in ('diffusers', 'peft', 'accelerate', 'transformers') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"shortcutfm.core pulled in {out}"
