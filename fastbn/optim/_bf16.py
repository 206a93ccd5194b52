"""bfloat16 optimizer state: the option checks, the lazily imported dtype,
and the NumPy reference of the kernels' rounding.

State kept in bfloat16 (``state_dtype="bfloat16"``) is widened to float32
for each update, updated in float32 exactly as float32 state would be, and
stored back rounded to bfloat16:

- stochastically (``stochastic_rounding=True``, the default): the float32
  bit pattern plus 16 random bits, truncated, which rounds up with
  probability (dropped bits) / 2**16 and so is unbiased;
- or to nearest-even.

NaN and infinity stay NaN and infinity.  The random bits come from a
counter-based generator: a 64-bit key per tensor mixed from (seed, step,
position of the parameter in its group) by SplitMix64's output function;
from it three 32-bit word keys per 2**32 elements; and a word is a 32-bit
integer hash of ``word_key + counter`` (low 32 bits of the counter).  A word
feeds two roundings (16 bits each): slots 0 and 1 (the first two state
arrays) share word 0, whose counter is the element index i (slot 0 its low
half, slot 1 its high half); slot 2 (the third state array) and slot 3 (a
bfloat16 parameter) draw words 1 and 2, whose counter is the pair index
``i >> 1`` (an even element takes the low half, an odd one the high half).
So any thread count and any resumed run draw the
same bits.  The functions below compute the same numbers as
src_c/common/fb_bf16.h, bit for bit; they are the oracle of the kernels and
the reference backend.

The NumPy bfloat16 dtype is ml_dtypes' (``pip install 'fastbn[bf16]'``),
imported only when bfloat16 state is asked for.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from .._validation import describe

__all__ = ["STATE_DTYPES", "bfloat16", "check_state_options", "tensor_key", "round_to_bf16",
           "widen", "reference_update"]

STATE_DTYPES = ("float32", "bfloat16")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

#: The rounding slot of a bfloat16 parameter (after the three state slots).
PARAM_SLOT = 3


def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16 as a NumPy dtype (ImportError naming the extra)."""
    try:
        import ml_dtypes
    except ImportError as error:
        raise ImportError("state_dtype='bfloat16' needs the ml_dtypes package (the NumPy bfloat16 "
                          "dtype): install it with `pip install 'fastbn[bf16]'`") from error
    return np.dtype(ml_dtypes.bfloat16)


def loaded_bfloat16_number() -> int:
    """bfloat16's NumPy type number, or -1 while ml_dtypes is not imported
    (no bfloat16 array can exist then), without importing it."""
    ml_dtypes = sys.modules.get("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16).num if ml_dtypes is not None else -1


def is_bfloat16(dtype: Any) -> bool:
    """True for ml_dtypes' bfloat16 (without importing ml_dtypes)."""
    return isinstance(dtype, np.dtype) and dtype.kind == "V" and dtype.itemsize == 2 \
        and dtype.name == "bfloat16"


def check_state_options(state_dtype: Any, stochastic_rounding: Any) -> Optional[np.dtype]:
    """Check the constructor options; the bfloat16 dtype, or None for float32."""
    if not isinstance(state_dtype, str):
        raise TypeError(f"state_dtype: expected one of {STATE_DTYPES} (a str), got {describe(state_dtype)}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype: expected one of {STATE_DTYPES}, got {state_dtype!r}")
    if not isinstance(stochastic_rounding, (bool, np.bool_)):
        raise TypeError(f"stochastic_rounding: expected a bool, got {describe(stochastic_rounding)}")
    return bfloat16() if state_dtype == "bfloat16" else None


# section: the counter-based generator ----------------------------------------

def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64_array(z: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, as C's does.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def tensor_key(seed: int, step: int, position: int) -> int:
    """The generator key of the parameter at `position` of its group at step
    `step` (the counter after this step's increment)."""
    key = _mix64((seed + _GOLDEN) & _MASK64)
    key = _mix64(key ^ (step & _MASK64))
    return _mix64(key ^ (position & _MASK64))


def _hash32_array(x: np.ndarray) -> np.ndarray:
    # uint32 array arithmetic wraps modulo 2**32, as C's does.
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _word_of(slot: int) -> int:
    """The word (0-2) rounding slot `slot` (0-3) draws."""
    return 0 if slot < 2 else slot - 1


def random_bits(key: int, n: int, slot: int) -> np.ndarray:
    """The 16 random bits (uint32 in [0, 2**16)) of rounding slot `slot`
    (0-2 state, 3 parameter) for each element 0 .. n-1 of the tensor with
    generator key `key`."""
    index = np.arange(n, dtype=np.uint64)
    high = index >> np.uint64(32)
    word = _word_of(slot)
    paired = slot >= 2
    with np.errstate(over="ignore"):
        word_key = _mix64_array(np.uint64(key) + (np.uint64(4) * high + np.uint64(word + 1))
                                * np.uint64(_GOLDEN)).astype(np.uint32)
        counter = (index >> np.uint64(1) if paired else index).astype(np.uint32)
        words = _hash32_array(word_key + counter)
    half = (index & np.uint64(1)).astype(bool) if paired else np.full(n, bool(slot & 1))
    return np.where(half, words >> np.uint32(16), words & np.uint32(0xFFFF)).astype(np.uint32)


# section: rounding -------------------------------------------------------------

def round_to_bf16(values: np.ndarray, key: int, slot: int, stochastic: bool) -> np.ndarray:
    """float32 `values` rounded to bfloat16 as the kernels store rounding
    slot `slot` (0-2 state, 3 parameter) of the tensor with generator key
    `key`: stochastically with that slot's 16 random bits of each element,
    or to nearest-even.  Returns a new bfloat16 array of `values`' shape."""
    bits = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)
    if stochastic:
        increment = random_bits(key, bits.size, slot)
    else:
        increment = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = ((bits + increment) >> np.uint32(16)).astype(np.uint16)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded[is_nan] = ((bits[is_nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded.view(bfloat16()).reshape(np.shape(values))


def widen(values: np.ndarray) -> np.ndarray:
    """bfloat16 `values` as float32 (exact)."""
    return np.asarray(values).astype(np.float32)


def reference_update(update: Callable[..., None], data: np.ndarray, grad: np.ndarray,
                     state: Dict[str, Any], group: Dict[str, Any], fresh: bool,
                     slots: Sequence[Optional[str]], position: int) -> None:
    """One parameter with bfloat16 state on the reference backend: `update`
    (the optimizer's float32 reference update) on float32 copies of the state,
    then each slot's result rounded back into the bfloat16 arrays in place."""
    widened = {key: (widen(value) if isinstance(value, np.ndarray) else value)
               for key, value in state.items()}
    update(data, grad, widened, group, fresh)
    key = tensor_key(int(group["rounding_seed"]), int(state["step"]), position)
    stochastic = bool(group["stochastic_rounding"])
    for slot, name in enumerate(slots):
        if name is not None:
            state[name][...] = round_to_bf16(widened[name], key, slot, stochastic)
