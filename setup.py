"""Build script. Metadata lives in pyproject.toml; this file is where the native (csrc)
extension will be declared, built only when requested and possible (DESIGN.md section 5)."""

from setuptools import setup

setup()
