"""A Jupyter kernel of the interpreter running the tests, for tests that drive real kernels."""
from __future__ import annotations

import sys
from pathlib import Path

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel


class _ThisInterpreter(KernelSpecManager):
    """A kernelspec for sys.executable, for machines where this environment has none installed."""

    def get_kernel_spec(self, kernel_name: str, *args, **kwargs) -> KernelSpec:
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="exo-lab tests", language="python", resource_dir=str(Path.cwd()))


def kernel_manager() -> KernelManager:
    """The environment's own python3 kernelspec (jupyter_client runs its "python" as
    sys.executable), else one made for sys.executable."""
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
        if Path(spec.resource_dir).resolve().is_relative_to(Path(sys.prefix).resolve()):
            return KernelManager(kernel_name="python3")
    except NoSuchKernel:
        pass
    return KernelManager(kernel_name="exo-lab-tests", kernel_spec_manager=_ThisInterpreter())
