"""Which GPU architectures a CUDA shared library carries, read from its ELF file.

    fatbin_archs(path) -> {"sass": [75, 90], "ptx": [90]}

nvcc puts the device code of every translation unit in the `.nv_fatbin` section as fat
binary containers: a 16-byte header (magic 0xBA55ED50, u16 version, u16 header size, u64
size of the entries), then entries, each a header (u16 kind: 1 PTX, 2 ELF/SASS; u32
header size at 4; u64 padded payload size at 8; u32 architecture at 28) and its payload.
Reading them here needs no CUDA toolkit (cuobjdump --list-elf / --list-ptx is often not
installed where the library runs). Standard library only: `libs/` imports no project code.
"""
from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["fatbin_archs", "FatbinError"]

_MAGIC = 0xBA55ED50
_KINDS = {1: "ptx", 2: "sass"}


class FatbinError(ValueError):
    """The file is not a 64-bit little-endian ELF or holds no `.nv_fatbin` section."""


def _section(data: bytes, name: bytes) -> bytes:
    """The contents of ELF64 section `name` (little-endian files only: x86-64, aarch64)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise FatbinError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
               for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for sh_name, _type, _flags, _addr, offset, size in headers:
        start = names_at + sh_name
        if data[start:start + len(name) + 1] == name + b"\0":
            return data[offset:offset + size]
    raise FatbinError(f"no {name.decode()} section (not built by nvcc, or no device code)")


def _entries(blob: bytes, start: int, end: int):
    """(kind, arch) of each entry of the container whose entries span [start, end)."""
    pos = start
    while pos + 32 <= end:
        kind, header_size, payload = struct.unpack_from("<H2xIQ", blob, pos)
        arch, = struct.unpack_from("<I", blob, pos + 28)
        if header_size == 0:   # zero padding, not an entry: nothing further to read
            return
        yield kind, arch
        pos += header_size + payload


def fatbin_archs(path: str | Path) -> dict:
    """{"sass": sorted architectures with machine code, "ptx": sorted ones with PTX}, as
    numbers (sm_86 -> 86). Raises FatbinError (or OSError) when it cannot be read."""
    try:
        return _archs(_section(Path(path).read_bytes(), b".nv_fatbin"))
    except (struct.error, IndexError) as err:    # offsets past the end: a truncated file
        raise FatbinError(f"malformed ELF or fat binary ({err})") from err


def _archs(blob: bytes) -> dict:
    found = {"sass": set(), "ptx": set()}
    pos = 0
    # Containers follow each other, 8-byte aligned; anything else between them is skipped.
    while pos + 16 <= len(blob):
        magic, _version, header, size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != _MAGIC:
            pos += 8
            continue
        for kind, arch in _entries(blob, pos + header, pos + header + size):
            if kind in _KINDS:
                found[_KINDS[kind]].add(arch)
        pos += header + size
    return {k: sorted(v) for k, v in found.items()}
