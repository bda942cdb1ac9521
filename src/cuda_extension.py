"""The toolkit's CUDA extensions, compiled on first use and reported once when they cannot be.

`CudaExtension(name, directory, sources, headers)` builds the sources with torch's JIT loader for the current
GPU's architecture; torch caches the build on disk under a name that hashes the sources, headers and flags, so an
edit rebuilds and a second process loads it. The build is tried once per process: a failure is kept and told with
the compiler's own error lines, either as one warning when the caller has a slower twin to fall back to, or as a
RuntimeError when it has none. Nothing is compiled at import.
"""
import functools
import hashlib
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

_CFLAGS = ["-O3"]
_CUDA_CFLAGS = ["-O3"]  # accurate expf and division: the kernels are bound by memory, not arithmetic


def failure_summary(exc: Exception, lines: int = 6) -> str:
    """The informative end of a build error: its compiler error lines if any, else its last lines."""
    text = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    errors = [line for line in text if "error" in line.lower()]
    return " | ".join((errors or text)[-lines:])


class CudaExtension:
    """One extension: `what` names it in messages ("the WKV CUDA kernel")."""

    def __init__(self, name: str, what: str, directory: Path, sources: Sequence[str], headers: Sequence[str] = ()):
        self.name, self.what, self.directory = name, what, directory
        self.sources, self.headers = tuple(sources), tuple(headers)
        self._loaded = None  # the module, or the exception that stopped its build

    def build(self):
        """Compile (or load from torch's extension cache) the module for the current device's architecture."""
        from torch.utils.cpp_extension import load

        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
        cuda_cflags = _CUDA_CFLAGS + [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        digest = hashlib.sha256()
        for name in self.sources + self.headers:
            digest.update((self.directory / name).read_bytes())
        digest.update(" ".join(_CFLAGS + cuda_cflags).encode())
        return load(name=f"{self.name}_{digest.hexdigest()[:16]}_sm{arch}",
                    sources=[str(self.directory / s) for s in self.sources],
                    extra_cflags=_CFLAGS, extra_cuda_cflags=cuda_cflags, verbose=False)

    def loaded(self):
        """The compiled module, or the exception that stopped its build (tried once per process)."""
        if self._loaded is None:
            try:
                self._loaded = self.build()
            except Exception as exc:  # a failed build must not stop training when a fallback exists
                self._loaded = exc
        return self._loaded

    def module(self):
        """The compiled module; a RuntimeError naming the cause if it could not be built."""
        loaded = self.loaded()
        if isinstance(loaded, Exception):
            raise RuntimeError(f"{self.what} could not be built: {failure_summary(loaded)}") from loaded
        return loaded

    def choose(self, fast: Callable, fallback: Optional[Callable], fallback_name: str) -> Callable:
        """`fast` once the module is built. If the build fails: `fallback` after one warning that names the cause
        and `fallback_name`, or a RuntimeError naming the cause when `fallback` is None."""
        loaded = self.loaded()
        if isinstance(loaded, Exception) and fallback is not None:
            _warn_fallback(self.what, failure_summary(loaded), fallback_name)
            return fallback
        self.module()
        return fast


@functools.cache
def _warn_fallback(what: str, cause: str, fallback_name: str) -> None:
    warnings.warn(f"{what} unavailable ({cause}); using {fallback_name} instead, which is much slower.",
                  RuntimeWarning, stacklevel=4)
