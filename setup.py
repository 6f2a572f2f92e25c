"""The build step pyproject.toml cannot express: ship the checkout's profiles/ and playbooks/ inside the package
(orchestrator/_data/), so an installed wheel finds its default profile and playbooks (orchestrator.core.paths.shipped).
Everything else about the package is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("profiles", "playbooks")


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        for name in SHIPPED:
            for src in sorted((ROOT / name).glob("*.yaml")):
                dest = Path(self.build_lib) / "orchestrator" / "_data" / name / src.name
                self.mkpath(str(dest.parent))
                self.copy_file(str(src), str(dest))


setup(cmdclass={"build_py": BuildPyWithData})
