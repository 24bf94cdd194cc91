"""Maps the repository's `plugins/` and `kernels/` folders to namespaced import
packages (`sparsify_plugins`, `sparsify_kernels`): a PyPI package called
`kernels` exists, so the folder names must not become import names."""
from setuptools import find_packages, setup

MAPPED = {"sparsify_plugins": "plugins", "sparsify_kernels": "kernels"}


def _packages():
    pkgs = find_packages(include=["sparsify_core", "sparsify_core.*"])
    for name, folder in MAPPED.items():
        pkgs += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return pkgs


setup(packages=_packages(), package_dir=dict(MAPPED))
