"""Type stubs of the compiled extension ``unilora_rs._core``."""

import numpy as np
import numpy.typing as npt

__all__ = [
    "SPEC_VERSION",
    "__version__",
    "fingerprint",
    "get_num_threads",
    "projection",
    "reconstruct",
    "reconstruct_backward",
    "set_num_threads",
]

__version__: str
SPEC_VERSION: int

def projection(
    seed: int, total: int, d: int
) -> tuple[npt.NDArray[np.int32] | npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def reconstruct(
    vector: npt.NDArray[np.float32], seed: int, shapes: list[tuple[int, int]]
) -> list[npt.NDArray[np.float32]]: ...
def reconstruct_backward(
    grad: npt.NDArray[np.float32], seed: int, d: int
) -> npt.NDArray[np.float32]: ...
def fingerprint(seed: int, d: int, shapes: list[tuple[str, int, int]]) -> str: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
