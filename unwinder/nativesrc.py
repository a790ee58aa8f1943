"""Hand-written native code: ``.ll`` / ``.s`` files rendered from named placeholders.

Hand-written LLVM IR and assembly live in files next to the Python module that
loads them (shipped as package data). This module is the one renderer for all
three packages:

* ``${NAME}`` is replaced by ``values[NAME]`` (an int, or text spliced as is);
* ``${Struct.field}`` is the field's index in ``%Struct`` (for
  ``getelementptr %Struct, ptr %p, i32 0, i32 ${Struct.field}``), and
  ``${Struct.field@}`` its byte offset (for ``getelementptr i8``);
* every ctypes ``Structure`` passed in ``structs`` is emitted at the top as
  ``%Struct = type { ... }``, derived from its ``_fields_``, so a field offset,
  a status number or a layout is written once (in Python) and the IR follows.

A placeholder with no value and a value (or struct) the text never uses are
both refused (:class:`NativeSourceError`), so a renamed field or a stale
constant cannot slip through.

Assembly (``.s``) is rendered the same way and handed to LLVM as ``module asm``
lines (:func:`module_asm`).

Every module that keeps such files lists them in a module-level
``NATIVE_SOURCES`` mapping, file name -> zero-argument function returning the
rendered text; ``tests/test_nativesrc.py`` renders and verifies every file of
the three packages through them.
"""
from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable, Mapping
from importlib import resources

from .errors import NativeSourceError

__all__ = ["read", "render", "render_file", "struct_type", "ir_type", "module_asm",
           "check_layout", "NativeSourceError"]

#: ``${NAME}``, ``${Struct.field}`` or ``${Struct.field@}`` (byte offset).
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*)(@?))?\}")

_SCALARS = {
    ctypes.c_int8: "i8", ctypes.c_uint8: "i8", ctypes.c_bool: "i8", ctypes.c_char: "i8",
    ctypes.c_int16: "i16", ctypes.c_uint16: "i16",
    ctypes.c_int32: "i32", ctypes.c_uint32: "i32",
    ctypes.c_int64: "i64", ctypes.c_uint64: "i64",
    ctypes.c_float: "float", ctypes.c_double: "double",
    ctypes.c_void_p: "ptr", ctypes.c_char_p: "ptr",
}


def read(package: str, filename: str) -> str:
    """The text of ``filename`` in ``package``'s folder (package data)."""
    try:
        return resources.files(package).joinpath(filename).read_text()
    except FileNotFoundError:
        raise NativeSourceError(f"{package}: no native source file {filename!r}") from None


def ir_type(ctype) -> str:
    """The LLVM type of a ctypes type: scalars, pointers, arrays, structures."""
    if ctype in _SCALARS:
        return _SCALARS[ctype]
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        return f"[{ctype._length_} x {ir_type(ctype._type_)}]"
    if isinstance(ctype, type) and issubclass(ctype, (ctypes._Pointer, ctypes._CFuncPtr)):
        return "ptr"
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
        return f"%{ctype.__name__}"
    raise NativeSourceError(f"no LLVM type for ctypes type {ctype!r}")


def struct_type(struct) -> str:
    """``%Name = type { ... }`` for a ctypes ``Structure`` (natural layout, checked)."""
    check_layout(struct)
    fields = ", ".join(ir_type(f[1]) for f in struct._fields_)
    return f"%{struct.__name__} = type {{ {fields} }}"


def check_layout(struct) -> None:
    """Raise :class:`NativeSourceError` unless ``struct``'s ctypes offsets are
    the natural (C, x86-64 SysV) ones, which is what LLVM's default data
    layout gives the ``%type`` :func:`struct_type` emits."""
    if getattr(struct, "_pack_", 0):
        raise NativeSourceError(f"{struct.__name__}: packed structures have no LLVM twin here")
    offset = 0
    for name, ctype, *bits in struct._fields_:
        if bits:
            raise NativeSourceError(f"{struct.__name__}.{name}: bit fields are not supported")
        align = ctypes.alignment(ctype)
        offset = (offset + align - 1) // align * align
        actual = getattr(struct, name).offset
        if actual != offset:
            raise NativeSourceError(f"{struct.__name__}.{name} is at byte {actual}, "
                                    f"the natural layout puts it at {offset}")
        offset += ctypes.sizeof(ctype)


def _field_index(struct, field: str) -> int:
    for i, f in enumerate(struct._fields_):
        if f[0] == field:
            return i
    raise NativeSourceError(f"{struct.__name__} has no field {field!r}")


def render(text: str, *, name: str = "<text>", structs: Iterable[type] = (),
           values: Mapping[str, object] | None = None, type_header: bool = True) -> str:
    """Fill ``text``'s placeholders (see the module docstring).

    ``structs``: ctypes ``Structure`` classes the text may name (``%S`` or
    ``${S.field}``); with ``type_header`` their ``%S = type`` lines are
    prepended. ``values``: ``NAME -> int | str``. ``name`` labels errors.
    """
    values = dict(values or {})
    by_name = {s.__name__: s for s in structs}
    clash = set(by_name) & set(values)
    if clash:
        raise NativeSourceError(f"{name}: {sorted(clash)} given both as a value and a struct")
    used_values, used_structs, missing = set(), set(), []

    def fill(m):
        head, field, offset = m.group(1), m.group(2), m.group(3)
        if field is not None:
            struct = by_name.get(head)
            if struct is None:
                missing.append(f"{head}.{field}")
                return m.group(0)
            used_structs.add(head)
            if offset:
                _field_index(struct, field)
                return str(getattr(struct, field).offset)
            return str(_field_index(struct, field))
        if head not in values:
            missing.append(head)
            return m.group(0)
        used_values.add(head)
        value = values[head]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise NativeSourceError(f"{name}: value {head!r} must be an int or text, "
                                    f"not {type(value).__name__}")
        return str(value)

    out = PLACEHOLDER.sub(fill, text)
    if missing:
        raise NativeSourceError(f"{name}: no value for placeholder(s) "
                                + ", ".join(sorted(set(missing))))
    for s in by_name:
        if re.search(rf"%{re.escape(s)}\b", out):
            used_structs.add(s)
    unused = sorted((set(values) - used_values) | (set(by_name) - used_structs))
    if unused:
        raise NativeSourceError(f"{name}: unused value(s) {', '.join(unused)}")
    if type_header and by_name:
        out = "\n".join(struct_type(s) for s in by_name.values()) + "\n" + out
    return out


def render_file(package: str, filename: str, **kwargs) -> str:
    """:func:`render` of :func:`read` ``(package, filename)``."""
    return render(read(package, filename), name=f"{package}/{filename}", **kwargs)


def module_asm(asm: str) -> str:
    """``asm`` as LLVM ``module asm`` lines (quotes and backslashes escaped)."""
    lines = []
    for line in asm.strip().splitlines():
        escaped = line.replace("\\", "\\5C").replace('"', "\\22")
        lines.append(f'module asm "{escaped}"')
    return "\n".join(lines) + "\n"
