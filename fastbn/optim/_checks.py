"""The checks an optimizer step makes on parameters, gradients and state
entries, shared by both backends so that they reject the same inputs with
the same messages.

Each function raises TypeError (wrong type or dtype) or ValueError (wrong
shape, layout, value or memory overlap) naming the parameter by group and
position (``param_groups[1]['params'][3]``); none of them changes anything.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._validation import FLOAT_DTYPES, describe
from ..parameter import Parameter

__all__ = ["param_name", "check_param_data", "checked_grad", "check_state_entry",
           "check_disjoint_params", "MAX_STEP"]

#: Largest step counter a state entry may hold: every whole number up to it
#: is exact in float64 (PyTorch keeps ``step`` as a float tensor, and the bias
#: corrections raise betas to it), and the next step fits the kernels' int64.
#: The same bound applies when a state_dict is loaded and when a step runs.
MAX_STEP = 2 ** 53


def param_name(group_index: int, position: int) -> str:
    """``param_groups[i]['params'][j]``: how every message names a parameter."""
    return f"param_groups[{group_index}]['params'][{position}]"


def is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes' bfloat16, recognized without importing ml_dtypes."""
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def check_param_data(param: Parameter, where: str, position: int, allow_bfloat16: bool = False) -> None:
    """`param.data` must be a writeable, aligned, C-contiguous float32/float64
    ndarray, or bfloat16 when `allow_bfloat16` (the kernels update it in
    place).  `where` names the group."""
    data = param.data
    name = f"{where}['params'][{position}].data"
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {describe(data)}")
    if data.dtype not in FLOAT_DTYPES and not (allow_bfloat16 and is_bfloat16(data.dtype)):
        if is_bfloat16(data.dtype):
            raise TypeError(f"{name}: expected dtype float32 or float64 (bfloat16 parameters are "
                            "for SGD, Momentum, RMSprop, Adam, AdamW and Lion), got bfloat16")
        raise TypeError(f"{name}: expected dtype float32 or float64, got {data.dtype}")
    if not data.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (updated in place), "
                         f"got strides {data.strides}")
    if not data.flags.aligned:
        raise ValueError(f"{name}: expected an aligned array, got a misaligned view")
    if not data.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array (updated in place), got a read-only one")


def checked_grad(param: Parameter, group_index: int, position: int,
                 allow_bfloat16: bool = False) -> Optional[np.ndarray]:
    """The gradient of `param` ready for an update, or None when it has none.

    Raises TypeError when the data or gradient dtype is wrong (they must be
    float32/float64 and equal) and ValueError when the shapes differ or the
    data is not a writeable, aligned, C-contiguous array.  A non-contiguous
    or misaligned gradient is copied (it is only read).
    """
    grad = param.grad
    if grad is None:
        return None
    check_param_data(param, f"param_groups[{group_index}]", position, allow_bfloat16)
    name = param_name(group_index, position) + ".grad"
    if not isinstance(grad, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {describe(grad)}")
    data = param.data
    if grad.dtype != data.dtype:
        raise TypeError(f"{name}: expected dtype {data.dtype} (the dtype of the parameter), "
                        f"got {grad.dtype}")
    if grad.shape != data.shape:
        raise ValueError(f"{name}: expected shape {data.shape} (the shape of the parameter), "
                         f"got {grad.shape}")
    if not (grad.flags.c_contiguous and grad.flags.aligned):
        grad = np.require(grad, requirements=["C", "A"])
    return grad


def check_state_entry(entry: Any, slots: Sequence[Optional[str]], counts_steps: bool,
                      data: np.ndarray, group_index: int, position: int,
                      scalar_key: Optional[str] = None, *,
                      state_dtype: Optional[np.dtype] = None) -> None:
    """An existing state entry (possibly loaded or edited by the user) must be
    a dict whose ``step`` (when the optimizer counts steps and the entry has
    one) is an int in [0, MAX_STEP], whose `scalar_key` value (NAdam's
    ``mu_product``, when it has one) is a float in [0, 1], and whose arrays
    for `slots` (the ones it has; missing ones get created) match the
    parameter: same dtype (or `state_dtype` when given: bfloat16 state) and
    shape, aligned, C-contiguous, writeable."""
    expected_dtype = data.dtype if state_dtype is None else state_dtype
    where = param_name(group_index, position)
    if not isinstance(entry, dict):
        raise TypeError(f"optimizer state of {where}: expected a dict, got {describe(entry)}")
    if counts_steps and "step" in entry:
        step = entry["step"]
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"optimizer state 'step' of {where}: expected an int, "
                            f"got {type(step).__name__} {step!r}")
        if not 0 <= step <= MAX_STEP:
            raise ValueError(f"optimizer state 'step' of {where}: expected an int in "
                             f"[0, 2**53], got {step!r}")
    if scalar_key is not None and scalar_key in entry:
        value = entry[scalar_key]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (float, int, np.floating, np.integer)):
            raise TypeError(f"optimizer state {scalar_key!r} of {where}: expected a float, "
                            f"got {type(value).__name__} {value!r}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"optimizer state {scalar_key!r} of {where}: expected a float in "
                             f"[0, 1], got {value!r}")
    for key in slots:
        if key is None or key not in entry:
            continue
        value = entry[key]
        if not (isinstance(value, np.ndarray) and value.dtype == expected_dtype
                and value.shape == data.shape and value.flags.c_contiguous
                and value.flags.writeable and value.flags.aligned):
            detail = (f" of dtype {value.dtype} and shape {value.shape}"
                      + ("" if value.flags.writeable else ", read-only")
                      if isinstance(value, np.ndarray) else "")
            raise ValueError(
                f"optimizer state {key!r} of {where}: expected an aligned C-contiguous "
                f"writeable ndarray of dtype {expected_dtype} and shape {data.shape} "
                f"(the parameter's), got {type(value).__name__}{detail}")


def check_disjoint_params(param_groups: List[Dict[str, Any]]) -> None:
    """No two parameters of an optimizer may share memory (ValueError naming both).

    The kernels update many tensors at once, in parallel; two parameters on
    the same memory would be updated twice, in an order that depends on the
    thread timing.  Contiguous arrays overlap exactly when their byte ranges
    do, so the ranges are sorted and swept; np.shares_memory settles the
    cases where a non-contiguous array only spans another.
    """
    # (first byte, end byte, order of appearance, name, array)
    extents: List[Tuple[int, int, int, str, np.ndarray]] = []
    for group_index, group in enumerate(param_groups):
        for position, param in enumerate(group["params"]):
            data = param.data
            if not isinstance(data, np.ndarray) or data.size == 0:
                continue
            low, high = _byte_extent(data)
            extents.append((low, high, len(extents), param_name(group_index, position), data))
    extents.sort(key=lambda extent: extent[0])
    open_extents: List[Tuple[int, int, int, str, np.ndarray]] = []
    for extent in extents:
        low = extent[0]
        open_extents = [other for other in open_extents if other[1] > low]
        for other in open_extents:
            if np.shares_memory(other[4], extent[4]):
                first, second = sorted((other, extent), key=lambda e: e[2])
                raise ValueError(
                    f"{first[3]} and {second[3]}: expected parameters on separate memory, got two "
                    "that share memory (they would be updated in parallel, with a result that "
                    "depends on the thread timing); give each parameter its own array")
        open_extents.append(extent)


def _byte_extent(data: np.ndarray) -> Tuple[int, int]:
    """[first byte, one past the last byte) that `data` (non-empty) can touch."""
    low = high = data.__array_interface__["data"][0]
    for length, stride in zip(data.shape, data.strides):
        if stride < 0:
            low += (length - 1) * stride
        else:
            high += (length - 1) * stride
    return low, high + data.itemsize
