"""The calling thread's alternate signal stack, kept across library calls that replace it.

OpenVINO 2026.4 (its Core, and each model it compiles) sets a new alternate signal stack (sigaltstack(2)) on the
calling thread, and frees that memory with a later Core or model without unsetting it. CPython installs its signal
handlers with SA_ONSTACK, so the next signal handled on that thread (SIGTERM from `systemctl stop`, SIGHUP from
`systemctl reload`, Ctrl-C) was delivered onto freed memory, and the process died with SIGSEGV: an agent whose
autotune had compiled two OpenVINO paths on its main thread, or that had switched away from an OpenVINO model,
never shut down cleanly (no offline state; a model on probation counted it as a crash). `same_signal_stack()`
puts back what the thread had before. Linux and other libcs with sigaltstack; elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes


class _StackT(ctypes.Structure):  # the C stack_t of sigaltstack(2)
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_libc = None


def _sigaltstack(new: _StackT | None = None) -> _StackT | None:
    """The calling thread's alternate signal stack (set to `new` when given); None where libc has no sigaltstack."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        old = _StackT()
        if _libc.sigaltstack(ctypes.byref(new) if new is not None else None, ctypes.byref(old)) != 0:
            return None
        return old
    except (OSError, AttributeError):
        return None


def _key(stack: _StackT) -> tuple:
    return stack.ss_sp, stack.ss_flags, stack.ss_size


@contextlib.contextmanager
def same_signal_stack():
    """Put back the calling thread's alternate signal stack after the block, if the block replaced it."""
    before = _sigaltstack()
    try:
        yield
    finally:
        if before is not None:
            after = _sigaltstack()
            if after is not None and _key(after) != _key(before):
                _sigaltstack(before)
