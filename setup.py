"""Packaging layout (everything else is in pyproject.toml).

The top-level ``configs/`` and ``recipes/`` folders are the source of truth. A wheel carries them as
``alignctl/configs`` and ``alignctl/recipes`` (mapped here, never copied into the source tree), so
an installed alignctl finds them without a checkout; see ``alignctl.compose.project_root``.
"""

from setuptools import find_namespace_packages, setup

SHIPPED = {"alignctl.configs": "configs", "alignctl.recipes": "recipes"}

setup(
    packages=find_namespace_packages(include=["alignctl", "alignctl.*"], exclude=["*.__pycache__"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={"alignctl": ["data/smoke/*.jsonl"], **{name: ["**/*.yaml"] for name in SHIPPED}},
    # Exactly the files named above (MANIFEST.in only feeds the source distribution).
    include_package_data=False,
)
