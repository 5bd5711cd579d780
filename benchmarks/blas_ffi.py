"""A UFM layer product through the BLAS that SciPy links (``dgemm``/``sgemm``), as an XLA FFI custom call (issue 20).

A benchmark experiment, not part of ``ufm``: ``python -m benchmarks.bench_steps --variants`` times GD-step loops of
the objective with its products here (``blas``) against ``ufm.objective`` (XLA's dot). It exists to answer whether
OpenBLAS, reached without ``jax.pure_callback``'s ~0.5-1 ms per call, makes a step faster than XLA:CPU's own dot; on
the 2-core box it did not (benchmarks/README.md, "Step throughput, round 6"), so the library keeps XLA's dot.

How it works, without a compiler and without a Python callback per product of the kind ``jax.pure_callback`` makes:

* the four products ``op(A) op(B)`` (``op`` the identity or the transpose) are registered as XLA FFI targets
  (typed FFI, ``jax.ffi.register_ffi_target``). Each target is a ``ctypes`` C function that reads the buffers from
  XLA's call frame (``xla/ffi/api/c_api.h``) and calls the ``dgemm``/``sgemm`` function pointer that
  ``scipy.linalg.cython_blas`` exports. The call still enters the interpreter (``ctypes`` callbacks hold the GIL), but
  it costs a few microseconds, not the ~0.5-1 ms of a ``pure_callback`` (which copies its operands to NumPy);
* `gemm_p` is a JAX primitive with the bilinear JVP and the transpose rules of a matrix product, so ``grad``,
  ``jvp(grad)`` (the certificates' Hessian-vector products) and ``vmap`` (the lanes of ``solve_batch``) work, every
  derivative product going through the same BLAS path. Off the CPU (or for other dtypes) it lowers to XLA's dot.

The row-major product ``C = op(A) op(B)`` (C: m x n) is computed as the column-major ``C^T = op(B)^T op(A)^T``, i.e.
``gemm(op_b, op_a, n, m, k, 1, B, ldb, A, lda, 0, C, n)`` with ``lda``/``ldb`` the row lengths of A and B.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["available", "gemm", "gemm_p", "matmul"]

# --- XLA FFI call frame (xla/ffi/api/c_api.h, 64-bit layout) -----------------------------------------------------
# XLA_FFI_CallFrame: struct_size @0, extension_start @8, api @16, ctx @24, stage @32, args @40 (XLA_FFI_Args: 40 bytes,
# its `args` array pointer at +32), rets @80 (XLA_FFI_Rets, `rets` at +32), attrs @120, future @168.
_FRAME_EXT, _FRAME_API, _FRAME_STAGE, _FRAME_ARGS, _FRAME_RETS = 8, 16, 32, 40 + 32, 80 + 32
# XLA_FFI_Buffer: struct_size @0, extension_start @8, dtype @16, data @24, rank @32, dims @40.
_BUF_DTYPE, _BUF_DATA, _BUF_RANK, _BUF_DIMS = 16, 24, 32, 40
# XLA_FFI_Extension_Base: struct_size @0, type @8, next @16; XLA_FFI_Metadata_Extension adds `metadata` @24.
# XLA_FFI_Metadata: struct_size @0, api_version (XLA_FFI_Api_Version: struct_size, extension_start, major @+16,
# minor @+20) @8, traits @32.
_EXT_TYPE, _EXT_METADATA, _META_MAJOR, _META_MINOR = 8, 24, 8 + 16, 8 + 20
_EXTENSION_METADATA, _STAGE_EXECUTE = 1, 3
_FFI_API_MAJOR, _FFI_API_MINOR = 0, 1  # the oldest typed-FFI version whose call frame has the fields read above
# XLA_FFI_Api: struct_size @0, extension_start @8, api_version (24 bytes) @16, internal_api @40, XLA_FFI_Error_Create
# @48. XLA_FFI_Error_Create_Args: struct_size, extension_start, message, errc.
_API_ERROR_CREATE = 48
_ERRC_INTERNAL = 13
_F32, _F64 = 11, 12  # XLA_FFI_DataType

_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
_GEMM_ARGS = [ctypes.c_void_p] * 13


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("message", ctypes.c_char_p),
        ("errc", ctypes.c_int),
    ]


_ERROR_CREATE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


def _capsule_pointer(capsule) -> int:
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return int(get_pointer(capsule, get_name(capsule)))


@functools.cache
def _blas_functions():
    """``{XLA dtype code: (gemm function, ctypes scalar type)}`` from SciPy's Cython BLAS, or ``{}`` if unavailable."""
    try:
        from scipy.linalg import cython_blas

        capi = cython_blas.__pyx_capi__  # type: ignore[attr-defined]
        gemm_type = ctypes.CFUNCTYPE(None, *_GEMM_ARGS)
        return {
            _F64: (gemm_type(_capsule_pointer(capi["dgemm"])), ctypes.c_double),
            _F32: (gemm_type(_capsule_pointer(capi["sgemm"])), ctypes.c_float),
        }
    except (ImportError, AttributeError, KeyError, ValueError, TypeError):  # pragma: no cover - exotic SciPy builds
        return {}


class _Cells:
    """Constant BLAS arguments kept alive for the handlers: 'N'/'T', alpha = 1 and beta = 0 per dtype, and one
    ``int`` cell per dimension value. Each method returns the address BLAS reads."""

    def __init__(self):
        self.chars = {False: ctypes.c_char(b"N"), True: ctypes.c_char(b"T")}
        self.scalars = {code: (scalar(1.0), scalar(0.0)) for code, (_, scalar) in _blas_functions().items()}
        self.ints: dict[int, ctypes.c_int] = {}

    def char(self, trans: bool) -> int:
        return ctypes.addressof(self.chars[trans])

    def alpha_beta(self, code: int) -> tuple[int, int]:
        one, zero = self.scalars[code]
        return ctypes.addressof(one), ctypes.addressof(zero)

    def int_(self, value: int) -> int:
        cell = self.ints.get(value)
        if cell is None:
            cell = self.ints[value] = ctypes.c_int(value)
        return ctypes.addressof(cell)


@functools.cache
def _cells() -> _Cells:
    return _Cells()


def _ffi_error(frame: int, message: str) -> int:
    """An XLA_FFI_Error made through the call frame's API table (XLA raises it as a runtime error)."""
    api = ctypes.c_void_p.from_address(frame + _FRAME_API).value
    create = _ERROR_CREATE(ctypes.c_void_p.from_address(api + _API_ERROR_CREATE).value)
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode(), _ERRC_INTERNAL)
    return create(ctypes.byref(args)) or 0


def _answer_metadata(ext: int) -> bool:
    """Fill XLA's metadata query (the FFI API version this handler was written against); True if it was one."""
    if ctypes.c_int.from_address(ext + _EXT_TYPE).value != _EXTENSION_METADATA:
        return False
    meta = ctypes.c_void_p.from_address(ext + _EXT_METADATA).value
    ctypes.c_int.from_address(meta + _META_MAJOR).value = _FFI_API_MAJOR
    ctypes.c_int.from_address(meta + _META_MINOR).value = _FFI_API_MINOR
    return True


def _make_handler(code: int, trans_a: bool, trans_b: bool, batch: int, ra: int, ca: int, rb: int, cb: int):
    """The FFI handler of ``C = op(A) op(B)`` for one dtype, layout and shape: A is (batch, ra, ca), B (batch, rb,
    cb), row-major. Every BLAS argument but the three data pointers is fixed here, so a call reads three pointers from
    the call frame and calls BLAS once per batch entry (see the module docstring for the mapping)."""
    gemm, _ = _blas_functions()[code]
    cells = _cells()
    m, k = (ca, ra) if trans_a else (ra, ca)
    n = rb if trans_b else cb
    alpha, beta = cells.alpha_beta(code)
    lda, ldb, ldc = cells.int_(max(1, ca)), cells.int_(max(1, cb)), cells.int_(max(1, n))
    head = (cells.char(trans_b), cells.char(trans_a), cells.int_(n), cells.int_(m), cells.int_(k), alpha)
    size = 8 if code == _F64 else 4
    sa, sb, sc = ra * ca * size, rb * cb * size, m * n * size
    addr, i32 = ctypes.c_void_p.from_address, ctypes.c_int.from_address
    get_ident = threading.get_ident
    empty = m == 0 or n == 0

    def handler(frame):
        try:
            if get_ident() not in _THREADS_KEPT:
                _keep_thread_state()
            ext = addr(frame + _FRAME_EXT).value
            if (ext and _answer_metadata(ext)) or empty or i32(frame + _FRAME_STAGE).value != _STAGE_EXECUTE:
                return None
            args = addr(frame + _FRAME_ARGS).value
            pa = addr(addr(args).value + _BUF_DATA).value
            pb = addr(addr(args + 8).value + _BUF_DATA).value
            pc = addr(addr(addr(frame + _FRAME_RETS).value).value + _BUF_DATA).value
            for j in range(batch):
                gemm(*head, pb + j * sb, ldb, pa + j * sa, lda, beta, pc + j * sc, ldc)
            return None
        except Exception as e:  # pragma: no cover - a bug here must not become a silent wrong number
            return _ffi_error(frame, f"ufm BLAS product failed: {e!r}")

    return _HANDLER(handler)


_THREADS_KEPT: set[int] = set()


def _keep_thread_state() -> None:
    """Keep this (XLA worker) thread's Python thread state between calls.

    A ``ctypes`` callback entered from a thread Python has not seen makes a thread state (``PyGILState_Ensure``) and
    deletes it on return; in CPython 3.11 that maps and unmaps the state's frame stack on every call (measured: ~10 us
    of page faults per product). One more ``PyGILState_Ensure``, never released, keeps the state for the thread's
    life: a few kB per XLA worker thread, and the GIL is still released on return (the callback's own release).
    """
    ctypes.pythonapi.PyGILState_Ensure()
    _THREADS_KEPT.add(threading.get_ident())


_HANDLERS: list = []  # the ctypes handlers must outlive every program that calls them


@functools.cache
def _target(code: int, trans_a: bool, trans_b: bool, batch: int, ra: int, ca: int, rb: int, cb: int) -> str:
    """Register (once) the FFI target of one dtype, layout and shape; returns its name."""
    name = f"ufm_blas_gemm_{code}_{'t' if trans_a else 'n'}{'t' if trans_b else 'n'}_{batch}_{ra}x{ca}_{rb}x{cb}"
    handler = _make_handler(code, trans_a, trans_b, batch, ra, ca, rb, cb)
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    _HANDLERS.append(handler)
    return name


@functools.cache
def available() -> bool:
    """True if the BLAS path can run here: SciPy's Cython BLAS exports ``dgemm``/``sgemm`` and XLA's CPU backend
    takes an FFI target (checked once, by registering the 1 x 1 product)."""
    if not _blas_functions():
        return False
    try:
        _target(_F64, False, False, 1, 1, 1, 1, 1)
    except Exception:  # pragma: no cover - a jaxlib without typed FFI registration
        return False
    return True


# --- the primitive -------------------------------------------------------------------------------------------------


def _swap(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _reference(a, b, *, trans_a: bool, trans_b: bool):
    """``op(A) op(B)`` with XLA's dot (the lowering off the CPU, and the abstract evaluation)."""
    return jnp.matmul(_swap(a) if trans_a else a, _swap(b) if trans_b else b)


def _abstract_eval(a, b, *, trans_a: bool, trans_b: bool):
    out = jax.eval_shape(functools.partial(_reference, trans_a=trans_a, trans_b=trans_b), a, b)
    return jax.core.ShapedArray(out.shape, out.dtype)


def _ffi(a, b, *, trans_a: bool, trans_b: bool):
    out = _abstract_eval(a, b, trans_a=trans_a, trans_b=trans_b)
    if a.dtype not in (jnp.float32, jnp.float64) or not available():
        return _reference(a, b, trans_a=trans_a, trans_b=trans_b)
    batch = int(np.prod(a.shape[:-2], dtype=np.int64))
    code = _F64 if a.dtype == jnp.float64 else _F32
    name = _target(code, trans_a, trans_b, batch, *a.shape[-2:], *b.shape[-2:])
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(out.shape, out.dtype))(a, b)


gemm_p = Primitive("ufm_blas_gemm")
"""``op(A) op(B)`` over the last two axes (equal leading batch axes), ``op`` set by ``trans_a``/``trans_b``."""
gemm_p.def_impl(lambda a, b, **kw: jax.jit(functools.partial(gemm_p.bind, **kw))(a, b))
gemm_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(gemm_p, mlir.lower_fun(_reference, multiple_results=False))
mlir.register_lowering(gemm_p, mlir.lower_fun(_ffi, multiple_results=False), platform="cpu")


def gemm(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """``op(A) op(B)`` through `gemm_p` (BLAS on the CPU).

    Args:
        a: (..., r_a, c_a) array, float32 or float64.
        b: (..., r_b, c_b) array of the same dtype and leading axes.
        trans_a: use ``A^T`` (then ``op(A)`` is c_a x r_a).
        trans_b: use ``B^T``.

    Returns:
        (..., m, n) array, ``op(A) @ op(B)``.
    """
    return gemm_p.bind(a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


def _transpose_a(ct, a, b, *, trans_a: bool, trans_b: bool):
    # C = op(A) op(B) is linear in A: dC/dA^T-contraction gives ct op(B)^T, stored transposed when A is used as A^T
    if isinstance(ct, ad.Zero):
        return ct
    return gemm(b, ct, trans_b, True) if trans_a else gemm(ct, b, False, not trans_b)


def _transpose_b(ct, a, b, *, trans_a: bool, trans_b: bool):
    # linear in B: op(A)^T ct, or its transpose ct^T op(A) when B is used as B^T
    if isinstance(ct, ad.Zero):
        return ct
    return gemm(ct, a, True, trans_a) if trans_b else gemm(a, ct, not trans_a, False)


ad.defbilinear(gemm_p, _transpose_a, _transpose_b)


def _batch(args, dims, *, trans_a: bool, trans_b: bool):
    a, b = args
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    a, b = (
        jnp.broadcast_to(x[None], (size,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)
        for x, d in zip((a, b), dims)
    )
    if a.ndim != b.ndim:  # one operand had leading axes the other lacked: give both the same
        lead = a.shape[:-2] if a.ndim > b.ndim else b.shape[:-2]
        a, b = (jnp.broadcast_to(x, lead + x.shape[-2:]) for x in (a, b))
    return gemm(a, b, trans_a, trans_b), 0


batching.primitive_batchers[gemm_p] = _batch


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``A @ B`` for A (m x k) and B (k x n) through `gemm` (BLAS) where `available`, float32/float64 and the
    dimensions fit BLAS's 32-bit integers; XLA's dot otherwise."""
    big = max(np.shape(a) + np.shape(b), default=0) >= 2**31 - 1
    if not big and a.dtype == b.dtype and a.dtype in (jnp.float32, jnp.float64) and available():
        return gemm(a, b)
    return a @ b
