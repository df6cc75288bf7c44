"""Packaging beyond pyproject.toml: the tracked stage adapters (``model_repository/<stage>/1/model.py``)
ship inside the package as ``rankserve/model_repository/``, so an installed wheel lays out a model
repository without the source tree (the build copies them from there)."""

from setuptools import find_packages, setup

STAGES = ("tokenize", "rank", "postprocess")

setup(
    packages=find_packages("src") + ["rankserve.model_repository"],
    package_dir={"": "src", "rankserve.model_repository": "model_repository"},
    package_data={"rankserve.model_repository": [f"{stage}/1/model.py" for stage in STAGES]},
)
