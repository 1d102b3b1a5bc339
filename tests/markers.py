"""Skip markers shared by the test files."""
import shutil
import subprocess

import pytest


def _fashion_mnist_package_installed() -> bool:
    """Whether Debian's dataset-fashion-mnist is installed (dpkg's word, not whether its files are found)."""
    if shutil.which("dpkg-query") is None:
        return False
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "dataset-fashion-mnist"], capture_output=True, text=True)
    return proc.returncode == 0 and "install ok installed" in proc.stdout


needs_fashion_mnist = pytest.mark.skipif(
    not _fashion_mnist_package_installed(), reason="Debian package dataset-fashion-mnist is not installed")
"""Skips a test only where the package is not installed: where it is, a test that cannot find or read its
files fails (CI installs it, so a broken reader is red there, not skipped)."""
