"""Wheels carry the default engine bundle as package data.

The bundle lives at the root of the source tree (``engines/<DEFAULT_ENGINE>``, where the export writes
it and a source checkout finds it); ``build_py`` copies it into ``rf_runtime/engines/`` of the build,
where ``rf_runtime.bundle.default_engine_dir`` looks first. Everything else is in pyproject.toml.
"""

import os
import re
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_engine() -> str:
    with open(os.path.join(ROOT, "rf_runtime", "bundle.py")) as f:
        return re.search(r'^DEFAULT_ENGINE = "([^"]+)"', f.read(), re.M).group(1)


class BuildPyWithBundle(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds the bundle in the checkout
        name = _default_engine()
        src = os.path.join(ROOT, "engines", name)
        if not os.path.isfile(os.path.join(src, "manifest.json")):
            raise RuntimeError(
                f"the default bundle {src} is missing: export it (scripts/train_world.sh export) "
                "before building a wheel"
            )
        dst = os.path.join(self.build_lib, "rf_runtime", "engines", name)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


setup(cmdclass={"build_py": BuildPyWithBundle})
