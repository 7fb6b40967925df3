"""Optional bundling of the shared library (everything else is in pyproject.toml).

With FLEETPROV_BUNDLE_LIBRARY=/path/to/libfleetprov.so set at build time, that file is copied into
the package as fleetprov/libfleetprov.so, where the loader finds it first after the
FLEETPROV_LIBRARY override. Such a wheel only works on the platform the library was built for.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithLibrary(build_py):
    def run(self) -> None:
        super().run()
        src = os.environ.get("FLEETPROV_BUNDLE_LIBRARY")
        if src:
            dst = os.path.join(self.build_lib, "fleetprov", "libfleetprov.so")
            self.mkpath(os.path.dirname(dst))
            shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildPyWithLibrary})
