"""The exceptions gspo-kernels raises: one class per kind of mistake.

Every class derives from :class:`GSPOKernelsError` (catch it to catch any of them) and from
the builtin exception the same mistake raised before these classes existed, so
``except ValueError`` / ``except TypeError`` clauses keep working:

| class | also a | raised for |
|---|---|---|
| :class:`ShapeError` | ``ValueError`` | a tensor of the wrong shape, rank or memory layout (strides) |
| :class:`DTypeError` | ``TypeError`` (and ``ValueError``) | a tensor of the wrong dtype, or an argument of the wrong Python type |
| :class:`DeviceError` | ``ValueError`` | tensors of one call on different devices |
| :class:`InputValueError` | ``ValueError`` | values found wrong on the device: ids outside ``[0, V)``, lengths outside ``[0, T]``, NaN/inf at valid positions, a float mask that is not 0/1, bad ``cu_seqlens`` |
| :class:`OptionError` | ``ValueError`` | an option or non-tensor argument out of range, or a combination that cannot run (``beta > 0`` without a reference, two arguments that exclude each other) |
| :class:`UnknownOptionError` | ``OptionError``, ``TypeError`` | an option name the loss does not know (with the nearest known one) |

Messages name the argument, what was expected and what came, and where one exists, the
fix (the slice or reshape that fits, the option's right name).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence

__all__ = [
    "DTypeError",
    "DeviceError",
    "GSPOKernelsError",
    "InputValueError",
    "OptionError",
    "ShapeError",
    "UnknownOptionError",
    "nearest",
    "reshape_hint",
]


class GSPOKernelsError(Exception):
    """Base class of every exception gspo-kernels raises for a caller's mistake."""


class ShapeError(GSPOKernelsError, ValueError):
    """A tensor of the wrong shape, number of dims or memory layout (e.g. ``tokens`` not
    ``logits.shape[:-1]``, a vocabulary dim that is not stride 1)."""


class DTypeError(GSPOKernelsError, TypeError, ValueError):
    """A tensor of the wrong dtype (e.g. int16 token ids, integer logits), or an argument of the
    wrong Python type (a list for a tensor, a string for a float). A ``TypeError``; a
    ``ValueError`` too, since some of these checks (``cu_seqlens``' dtype) raised one before."""


class DeviceError(GSPOKernelsError, ValueError):
    """Tensors of one call on different devices."""


class InputValueError(GSPOKernelsError, ValueError):
    """Values the checks read from the device: ids outside ``[0, V)`` or lengths outside
    ``[0, T]`` at valid positions, NaN/inf in old/reference log-probs, advantages, rewards or a
    correction ratio at valid positions, a float mask with values other than 0 and 1, bad
    ``cu_seqlens``. Raised once per call, after the kernels (``check_inputs=False``: never)."""


class OptionError(GSPOKernelsError, ValueError):
    """An option or non-tensor argument out of its range (``epsilon=1.5``, an unknown
    ``loss_type``), or a combination that cannot run (``beta > 0`` without a reference, both
    ``mask`` and ``lengths``)."""


class UnknownOptionError(OptionError, TypeError):
    """An option name the loss does not know (a ``TypeError`` too, as Python raises for an
    unexpected keyword argument); the message names the nearest known name."""


def nearest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` (difflib), or None when none is close."""
    hits = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    return hits[0] if hits else None


def reshape_hint(name: str, got: Sequence[int], want: Sequence[Sequence[int]]) -> str:
    """``"; name.reshape(B, G, T) fits"`` when ``got`` holds as many elements as one of the wanted
    shapes (the first such), else ``""``: the fix for a tensor laid out flat or grouped otherwise;
    ``"; name.permute(...) fits if ..."`` when ``got`` is the same sizes in another order."""
    got = tuple(int(s) for s in got)
    n = math.prod(got)
    for wanted in want:
        shape = tuple(int(s) for s in wanted)
        if got == shape or math.prod(shape) != n:
            continue
        if len(got) == len(shape) and sorted(got) == sorted(shape):
            # the same sizes in another order: transposed axes, which a reshape would scramble
            free = list(range(len(got)))
            perm = tuple(free.pop(next(j for j, i in enumerate(free) if got[i] == size)) for size in shape)
            return f"; {name}.permute{perm} fits if its axes are in another order (a reshape would scramble them)"
        return f"; {name}.reshape{shape if len(shape) != 1 else f'({shape[0]})'} fits"
    return ""
