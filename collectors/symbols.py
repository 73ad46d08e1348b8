"""Function name -> address resolution for ELF64 x86-64 binaries, stripped or not.

bpftrace attaches uprobes by symbol name only when the binary has a symbol table. Release
builds of Ollama are stripped (``-ldflags=-w -s``), but Go's own function table
(``.gopclntab``) survives stripping, so Go functions can still be found and probed by address
(``uprobe:/path:0xADDR``). This module reads, with ``struct`` over an ``mmap`` (no pyelftools):

* ``.symtab`` / ``.strtab`` (``STT_FUNC`` symbols, gone when stripped),
* ``.dynsym`` / ``.dynstr`` (exported C functions, survive stripping),
* Go's pcHeader table (Go 1.20+, magic ``0xfffffff1``), found as ``.gopclntab``,
  ``.data.rel.ro.gopclntab`` (PIE), via the ``runtime.pclntab`` symbol, or by scanning
  read-only data for the magic.

Since Go 1.26 the pcHeader no longer stores the text start (it needed a relocation), and for
cgo (externally linked) binaries the Go text does not start at the ``.text`` section. The text
start is therefore taken, in order, from the header (Go 1.20-1.25), from ``runtime.moduledata``
(found by its pointer to the pcHeader; via ``R_X86_64_RELATIVE`` relocations in PIE builds),
from the ``runtime.text`` symbol, and last from the ``.text`` section address.

Lookup prefers ``.symtab``, then ``.gopclntab``, then ``.dynsym``.
"""

from __future__ import annotations

import mmap
import struct
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeAlias

Buffer: TypeAlias = "bytes | bytearray | mmap.mmap"

GO120_PCLNTAB_MAGIC = 0xFFFFFFF1
_MAGIC_BYTES = struct.pack("<I", GO120_PCLNTAB_MAGIC)

_EM_X86_64 = 62
_SHT_SYMTAB = 2
_SHT_NOBITS = 8
_SHT_RELA = 4
_SHT_DYNSYM = 11
_SHF_WRITE = 0x1
_SHF_ALLOC = 0x2
_SHF_EXECINSTR = 0x4
_PT_LOAD = 1
_STT_FUNC = 2
_STB_LOCAL = 0
_SHN_UNDEF = 0
_R_X86_64_RELATIVE = 8
_FUNC_SIZE = 44  # runtime._func up to nfuncdata
_FUNC_FLAG_ASM = 1 << 2  # abi.FuncFlagAsm
_ABI0 = ".abi0"

_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size
_RELA = struct.Struct("<QQq")  # r_offset, r_info, r_addend
_PRIORITY = {"symtab": 0, "gopclntab": 1, "dynsym": 2}

# Offsets inside runtime.moduledata (unchanged from Go 1.20 through 1.26): pcHeader pointer,
# then six slices (funcnametab, cutab, filetab, pctab, pclntable, ftab), findfunctab, minpc,
# maxpc, text.
_MD_FUNCNAMETAB = 8
_MD_FTAB = 8 + 5 * 24
_MD_TEXT = 8 + 6 * 24 + 3 * 8


@dataclass(frozen=True)
class Symbol:
    """A function: ``size`` is None where the table does not say (``st_size`` of 0)."""

    name: str
    address: int
    size: int | None
    source: str  # "symtab" | "dynsym" | "gopclntab"


@dataclass(frozen=True)
class PclnHeader:
    """Go 1.20+ ``runtime.pcHeader``. All ``*_offset`` fields are relative to the header start."""

    min_lc: int
    ptr_size: int
    nfunc: int
    nfiles: int
    text_start: int  # 0 when not stored (Go 1.26+) or not yet relocated (PIE)
    funcname_offset: int
    cu_offset: int
    filetab_offset: int
    pctab_offset: int
    pcln_offset: int


def parse_pclntab_header(buf: Buffer, offset: int = 0, limit: int | None = None) -> PclnHeader:
    """Read and sanity-check a Go 1.20+ pcHeader at ``buf[offset:]``; ValueError if it is not one.

    ``limit`` is the end of the table in ``buf`` (defaults to the end of ``buf``); the offsets in
    the header and the function table must fall inside it.
    """
    end = len(buf) if limit is None else limit
    if offset < 0 or offset + 72 > end:
        raise ValueError("pclntab: too short for a pcHeader")
    magic, pad1, pad2, min_lc, ptr_size = struct.unpack_from("<IBBBB", buf, offset)
    if magic != GO120_PCLNTAB_MAGIC:
        raise ValueError(f"pclntab: magic {magic:#x} is not the Go 1.20+ magic {GO120_PCLNTAB_MAGIC:#x}")
    if pad1 or pad2 or min_lc not in (1, 2, 4) or ptr_size != 8:
        raise ValueError(f"pclntab: implausible header (pad {pad1},{pad2} minLC {min_lc} ptrSize {ptr_size})")
    nfunc, nfiles, text_start, fname, cu, ftab, pctab, pcln = struct.unpack_from("<8Q", buf, offset + 8)
    size = end - offset
    if not 0 < nfunc < 10_000_000 or nfiles > 10_000_000:
        raise ValueError(f"pclntab: implausible counts (nfunc {nfunc}, nfiles {nfiles})")
    if not 72 <= fname <= cu <= ftab <= pctab <= pcln < size:
        raise ValueError("pclntab: table offsets out of order or out of bounds")
    if pcln + (nfunc + 1) * 8 > size:
        raise ValueError("pclntab: function table runs past the end")
    return PclnHeader(min_lc, ptr_size, nfunc, nfiles, text_start, fname, cu, ftab, pctab, pcln)


class PclnFunc(NamedTuple):
    """One function of the pclntab; ``entry`` is an offset from the Go text start."""

    name: str
    entry: int
    size: int  # distance to the next function's entry (includes alignment padding)
    func_id: int
    flag: int


def iter_pclntab_functions(
    buf: Buffer, offset: int = 0, header: PclnHeader | None = None, limit: int | None = None
) -> Iterator[PclnFunc]:
    """Yield each function of the table at ``buf[offset:]`` in functab (address) order.

    The last function ends at the final functab sentinel (``etext``).
    """
    hdr = header if header is not None else parse_pclntab_header(buf, offset, limit)
    end = len(buf) if limit is None else limit
    ftab = offset + hdr.pcln_offset
    names = offset + hdr.funcname_offset
    pairs = struct.unpack_from(f"<{2 * (hdr.nfunc + 1)}I", buf, ftab)
    for i in range(hdr.nfunc):
        entry, funcoff = pairs[2 * i], pairs[2 * i + 1]
        next_entry = pairs[2 * i + 2]
        fpos = ftab + funcoff
        if fpos + _FUNC_SIZE > end:
            raise ValueError(f"pclntab: _func {i} at {funcoff:#x} is out of bounds")
        func_entry, name_off = struct.unpack_from("<Ii", buf, fpos)
        if func_entry != entry:
            raise ValueError(f"pclntab: _func {i} entry {func_entry:#x} does not match functab {entry:#x}")
        start = names + name_off
        stop = buf.find(b"\0", start, end)
        if name_off < 0 or stop < 0:
            raise ValueError(f"pclntab: name of function {i} is out of bounds")
        func_id, flag = buf[fpos + 40], buf[fpos + 41]
        # .symtab and `go tool nm` write the "·" of generated names as "."; do the same.
        name = buf[start:stop].decode("utf-8", "replace").replace("·", ".")
        yield PclnFunc(name, entry, max(next_entry - entry, 0), func_id, flag)


def pclntab_symbol_names(funcs: list[PclnFunc]) -> list[str]:
    """Names as the Go linker writes them into ``.symtab`` (what ``go tool nm`` shows).

    A function with both an ABI0 and an ABIInternal body appears twice in the pclntab under one
    name; ``.symtab`` calls the ABI0 one ``NAME.abi0``. The ABI0 one is the assembly body
    (``FuncFlagAsm``) when there is one, else the ABI0 wrapper of a Go function, which the linker
    places after the Go body.
    """
    groups: dict[str, list[int]] = {}
    for i, fn in enumerate(funcs):
        groups.setdefault(fn.name, []).append(i)
    out = [fn.name for fn in funcs]
    for name, idx in groups.items():
        if len(idx) != 2:
            continue
        asm = [i for i in idx if funcs[i].flag & _FUNC_FLAG_ASM]
        abi0 = asm[0] if len(asm) == 1 else idx[-1]
        out[abi0] = name + _ABI0
    return out


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int


@dataclass(frozen=True)
class _Segment:
    vaddr: int
    offset: int
    filesz: int


class _Elf:
    """Just enough ELF64 LE x86-64 reading over a buffer."""

    def __init__(self, buf: Buffer, label: str) -> None:
        self.buf = buf
        if len(buf) < 64 or buf[:4] != b"\x7fELF":
            raise ValueError(f"{label}: not an ELF file")
        ei_class, ei_data = buf[4], buf[5]
        (machine,) = struct.unpack_from("<H", buf, 18)
        if ei_class != 2 or ei_data != 1 or machine != _EM_X86_64:
            raise ValueError(
                f"{label}: not an ELF64 little-endian x86-64 binary "
                f"(class {ei_class}, data {ei_data}, machine {machine}); only x86-64 is supported"
            )
        (phoff, shoff) = struct.unpack_from("<QQ", buf, 32)
        phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", buf, 54)
        self.segments: list[_Segment] = []
        for i in range(phnum):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                "<IIQQQQ", buf, phoff + i * phentsize
            )
            if p_type == _PT_LOAD:
                self.segments.append(_Segment(p_vaddr, p_offset, p_filesz))
        raw: list[tuple[int, int, int, int, int, int, int]] = []
        if shoff and shnum:
            for i in range(shnum):
                name, typ, flags, addr, off, size, link = struct.unpack_from("<IIQQQQI", buf, shoff + i * shentsize)
                raw.append((name, typ, flags, addr, off, size, link))
        self.sections: list[_Section] = []
        if raw and shstrndx < len(raw):
            stroff = raw[shstrndx][4]
            for name, typ, flags, addr, off, size, link in raw:
                self.sections.append(_Section(self._cstr(stroff + name), typ, flags, addr, off, size, link))

    def _cstr(self, pos: int) -> str:
        stop = self.buf.find(b"\0", pos)
        return self.buf[pos:stop].decode("utf-8", "replace")

    def section(self, name: str) -> _Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def file_offset(self, address: int) -> int | None:
        for seg in self.segments:
            if seg.vaddr <= address < seg.vaddr + seg.filesz:
                return address - seg.vaddr + seg.offset
        return None

    def read_u64_at(self, address: int) -> int | None:
        off = self.file_offset(address)
        if off is None or off + 8 > len(self.buf):
            return None
        return int(struct.unpack_from("<Q", self.buf, off)[0])

    def symbols(self, sec: _Section, source: str) -> Iterator[tuple[Symbol, bool]]:
        """Defined STT_FUNC symbols of a SYMTAB/DYNSYM section, with whether each is local."""
        if sec.type == _SHT_NOBITS or sec.link >= len(self.sections):
            return
        strtab = self.sections[sec.link].offset
        buf = self.buf
        data = buf[sec.offset : sec.offset + sec.size - sec.size % _SYM.size]
        for st_name, st_info, _other, shndx, value, size in _SYM.iter_unpack(data):
            if st_info & 0xF != _STT_FUNC or shndx == _SHN_UNDEF or value == 0:
                continue
            pos = strtab + st_name
            name = buf[pos : buf.find(b"\0", pos)].decode("utf-8", "replace")
            if name:
                yield Symbol(name, value, size or None, source), st_info >> 4 == _STB_LOCAL

    def relative_relocs(self) -> dict[int, int]:
        """``r_offset -> r_addend`` of every R_X86_64_RELATIVE relocation (PIE builds)."""
        out: dict[int, int] = {}
        for sec in self.sections:
            if sec.type != _SHT_RELA:
                continue
            data = self.buf[sec.offset : sec.offset + sec.size - sec.size % _RELA.size]
            for r_offset, r_info, r_addend in _RELA.iter_unpack(data):
                if r_info & 0xFFFFFFFF == _R_X86_64_RELATIVE:
                    out[r_offset] = r_addend
        return out


class SymbolTable:
    """Every function of one ELF binary, by name and by address. Build with :meth:`load`."""

    def __init__(
        self,
        path: Path,
        symbols: Iterable[Symbol],
        segments: list[_Segment],
        has_symtab: bool,
        go_text_start: int | None = None,
    ) -> None:
        self.path = path
        self.go_text_start = go_text_start  # None: no Go pclntab was found (or it was unreadable)
        self.pclntab_error: str | None = None
        self._segments = segments
        self._has_symtab = has_symtab
        self._by_name: dict[str, Symbol] = {}
        ordered = sorted(symbols, key=lambda s: _PRIORITY[s.source])
        for sym in ordered:
            self._by_name.setdefault(sym.name, sym)
        # By address: at one address prefer a sized entry, then the preferred source.
        by_addr = sorted(ordered, key=lambda s: (s.address, s.size is None, _PRIORITY[s.source]))
        self._starts: list[int] = []
        self._entries: list[tuple[int, str]] = []  # (end or -1 if unknown, name)
        for sym in by_addr:
            if self._starts and self._starts[-1] == sym.address:
                continue
            self._starts.append(sym.address)
            self._entries.append((sym.address + sym.size if sym.size else -1, sym.name))
        self.counts: dict[str, int] = {}
        for sym in ordered:
            self.counts[sym.source] = self.counts.get(sym.source, 0) + 1

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> SymbolTable:
        """Parse ``path`` once. ValueError if it is not an ELF64 little-endian x86-64 file."""
        path = Path(path)
        with path.open("rb") as fh:
            try:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # empty file
                raise ValueError(f"{path}: not an ELF file ({exc})") from exc
            try:
                return cls._from_elf(path, _Elf(mm, str(path)))
            finally:
                mm.close()

    @classmethod
    def _from_elf(cls, path: Path, elf: _Elf) -> SymbolTable:
        symbols: list[Symbol] = []
        symtab_sec = next((s for s in elf.sections if s.type == _SHT_SYMTAB), None)
        symtab: dict[str, Symbol] = {}
        if symtab_sec is not None:
            local: dict[str, bool] = {}
            for sym, is_local in elf.symbols(symtab_sec, "symtab"):
                # Duplicate names (static C functions): keep the first global, else the first local.
                if sym.name not in symtab or (local[sym.name] and not is_local):
                    symtab[sym.name] = sym
                    local[sym.name] = is_local
            symbols.extend(symtab.values())
        dynsym_sec = next((s for s in elf.sections if s.type == _SHT_DYNSYM), None)
        if dynsym_sec is not None:
            seen: set[str] = set()
            for sym, _ in elf.symbols(dynsym_sec, "dynsym"):
                if sym.name not in seen:
                    seen.add(sym.name)
                    symbols.append(sym)
        text_start: int | None = None
        pclntab_error: str | None = None
        found = _find_pclntab(elf)
        if found is not None:
            pcln_addr, pcln_off, pcln_end, hdr = found
            text_start = _go_text_start(elf, pcln_addr, hdr, symtab)
            try:
                funcs = list(iter_pclntab_functions(elf.buf, pcln_off, hdr, pcln_end))
            except ValueError as exc:  # a damaged table must not cost us .symtab and .dynsym
                pclntab_error, text_start = str(exc), None
            if text_start is not None:
                seen_go: set[str] = set()
                for name, fn in zip(pclntab_symbol_names(funcs), funcs, strict=True):
                    if name not in seen_go:
                        seen_go.add(name)
                        symbols.append(Symbol(name, text_start + fn.entry, fn.size or None, "gopclntab"))
        table = cls(path, symbols, elf.segments, symtab_sec is not None, text_start)
        table.pclntab_error = pclntab_error
        return table

    # -- queries --------------------------------------------------------------------------
    @property
    def stripped(self) -> bool:
        """True when the binary has no ``.symtab`` (``strip``, ``-ldflags=-s``)."""
        return not self._has_symtab

    def __len__(self) -> int:
        return len(self._by_name)

    def lookup(self, name: str) -> Symbol | None:
        """The function called ``name``, preferring ``.symtab``, then ``.gopclntab``, then ``.dynsym``.

        Go names differ slightly between ``.symtab`` (what ``go tool nm`` prints) and the
        pclntab: ``.symtab`` suffixes ABI0 functions (assembly, cgo ``_Cfunc_`` stubs, ABI
        wrappers) with ``.abi0`` and writes ``·`` as ``.``. So an exact miss retries with the
        ``.abi0`` suffix removed or added, and ``·`` normalised; the returned Symbol carries the
        name it was found under.
        """
        sym = self._by_name.get(name)
        if sym is not None:
            return sym
        norm = name.replace("·", ".")
        alt = norm[: -len(_ABI0)] if norm.endswith(_ABI0) else norm + _ABI0
        for candidate in (norm, alt):
            sym = self._by_name.get(candidate)
            if sym is not None:
                return sym
        return None

    def names(self) -> list[str]:
        """Every function name the table has (mangled, for C++)."""
        return list(self._by_name)

    def resolve_many(self, names: Iterable[str]) -> tuple[dict[str, Symbol], list[str]]:
        """``(found, missing)``: found maps each resolvable name to its Symbol, missing keeps input order."""
        found: dict[str, Symbol] = {}
        missing: list[str] = []
        for name in names:
            sym = self.lookup(name)
            if sym is not None:
                found[name] = sym
            elif name not in missing:
                missing.append(name)
        return found, missing

    def function_at(self, address: int) -> str | None:
        """The function containing ``address`` (for symbolizing stacks), or None.

        Where a function's size is unknown, it is taken to extend to the next function.
        """
        i = bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        end, name = self._entries[i]
        if end == -1:
            if i + 1 < len(self._starts) and address >= self._starts[i + 1]:
                return None
        elif address >= end:
            return None
        return name

    def address_of_file_offset(self, offset: int) -> int | None:
        """File offset -> virtual address (the inverse of :meth:`file_offset`), for resolving a
        runtime address through ``/proc/PID/maps``; None if no PT_LOAD segment holds it."""
        for seg in self._segments:
            if seg.offset <= offset < seg.offset + seg.filesz:
                return offset - seg.offset + seg.vaddr
        return None

    def file_offset(self, address: int) -> int:
        """Virtual address -> file offset, through the PT_LOAD program headers; ValueError if unmapped."""
        for seg in self._segments:
            if seg.vaddr <= address < seg.vaddr + seg.filesz:
                return address - seg.vaddr + seg.offset
        raise ValueError(f"{self.path}: address {address:#x} is not in any file-backed PT_LOAD segment")


def _find_pclntab(elf: _Elf) -> tuple[int, int, int, PclnHeader] | None:
    """``(vaddr, file offset, file end, header)`` of the Go 1.20+ pclntab, or None if there is none."""
    for name in (".gopclntab", ".data.rel.ro.gopclntab"):
        sec = elf.section(name)
        if sec is not None and sec.type != _SHT_NOBITS:
            try:
                hdr = parse_pclntab_header(elf.buf, sec.offset, sec.offset + sec.size)
            except ValueError:
                continue
            return sec.addr, sec.offset, sec.offset + sec.size, hdr
    # runtime.pclntab is an OBJECT symbol, so it is not in the FUNC-only table: read it directly.
    sym_addr = _object_symbol(elf, "runtime.pclntab")
    if sym_addr is not None:
        off = elf.file_offset(sym_addr)
        if off is not None:
            end = _containing_end(elf, sym_addr, off)
            try:
                return sym_addr, off, end, parse_pclntab_header(elf.buf, off, end)
            except ValueError:
                pass
    # Scan allocated, non-executable data for the magic.
    for sec in elf.sections:
        if sec.type == _SHT_NOBITS or not sec.flags & _SHF_ALLOC or sec.flags & _SHF_EXECINSTR:
            continue
        end = sec.offset + sec.size
        pos = elf.buf.find(_MAGIC_BYTES, sec.offset, end)
        while pos >= 0:
            if (pos - sec.offset) % 8 == 0:
                try:
                    return sec.addr + pos - sec.offset, pos, end, parse_pclntab_header(elf.buf, pos, end)
                except ValueError:
                    pass
            pos = elf.buf.find(_MAGIC_BYTES, pos + 1, end)
    return None


def _object_symbol(elf: _Elf, wanted: str) -> int | None:
    sec = next((s for s in elf.sections if s.type == _SHT_SYMTAB), None)
    if sec is None or sec.link >= len(elf.sections):
        return None
    strtab = elf.sections[sec.link].offset
    key = wanted.encode() + b"\0"
    data = elf.buf[sec.offset : sec.offset + sec.size - sec.size % _SYM.size]
    for st_name, _info, _other, shndx, value, _size in _SYM.iter_unpack(data):
        if shndx != _SHN_UNDEF and elf.buf[strtab + st_name : strtab + st_name + len(key)] == key:
            return int(value)
    return None


def _containing_end(elf: _Elf, addr: int, off: int) -> int:
    for sec in elf.sections:
        if sec.type != _SHT_NOBITS and sec.addr <= addr < sec.addr + sec.size:
            return sec.offset + sec.size
    return len(elf.buf) if off < len(elf.buf) else off


def _go_text_start(elf: _Elf, pcln_addr: int, hdr: PclnHeader, symtab: dict[str, Symbol]) -> int | None:
    if hdr.text_start:  # Go 1.20-1.25, non-PIE
        return hdr.text_start
    md = _find_moduledata(elf, pcln_addr, hdr)
    if md is not None:
        return md
    sym = symtab.get("runtime.text")
    if sym is not None:
        return sym.address
    text = elf.section(".text")
    return text.addr if text is not None else None


def _find_moduledata(elf: _Elf, pcln_addr: int, hdr: PclnHeader) -> int | None:
    """``runtime.firstmoduledata.text``, found via moduledata's pointer to the pcHeader."""
    want_names = pcln_addr + hdr.funcname_offset
    want_ftab = pcln_addr + hdr.pcln_offset
    needle = struct.pack("<Q", pcln_addr)
    data_secs = [s for s in elf.sections if s.type != _SHT_NOBITS and s.flags & _SHF_ALLOC and s.flags & _SHF_WRITE]
    data_secs.sort(key=lambda s: s.name != ".go.module")  # Go 1.26 puts it in its own section
    for sec in data_secs:
        end = sec.offset + sec.size
        pos = elf.buf.find(needle, sec.offset, end)
        while pos >= 0:
            if (pos - sec.offset) % 8 == 0 and pos + _MD_TEXT + 8 <= end:
                names, ftab, text = (
                    struct.unpack_from("<Q", elf.buf, pos + o)[0] for o in (_MD_FUNCNAMETAB, _MD_FTAB, _MD_TEXT)
                )
                if names == want_names and ftab == want_ftab and text:
                    return int(text)
            pos = elf.buf.find(needle, pos + 1, end)
    # PIE: the pointers are zero in the file and filled in by R_X86_64_RELATIVE relocations.
    relocs = elf.relative_relocs()
    for where, addend in relocs.items():
        if addend != pcln_addr:
            continue
        if relocs.get(where + _MD_FUNCNAMETAB) == want_names and relocs.get(where + _MD_FTAB) == want_ftab:
            text = relocs.get(where + _MD_TEXT)
            if text:
                return text
    return None
