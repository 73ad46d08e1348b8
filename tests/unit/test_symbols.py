"""Function name -> address resolution: the Go pclntab parser on synthetic bytes, the ELF reader
on small synthetic ELF files and on the system's own binaries."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from ollama_tracer.collectors.symbols import (
    GO120_PCLNTAB_MAGIC,
    PclnFunc,
    Symbol,
    SymbolTable,
    iter_pclntab_functions,
    parse_pclntab_header,
    pclntab_symbol_names,
)

FLAG_ASM = 4
WRAPPER = 23

# (name, entry offset from text start, funcID, flag); the table ends at ETEXT.
FUNCS = [
    ("runtime.text.first", 0x00, 0, 0),
    ("github.com/ollama/ollama/server.(*Server).GenerateHandler", 0x40, 0, 0),
    ("runtime.reflectcall", 0x100, 0, FLAG_ASM),  # assembly body: ABI0
    ("runtime.osinit", 0x140, 0, 0),  # Go body: ABIInternal
    ("runtime.osinit", 0x180, WRAPPER, 0),  # its ABI0 wrapper
    ("runtime.reflectcall", 0x1A0, WRAPPER, 0),  # ABIInternal wrapper of the assembly body
    ("type:.eq.net.result[int]·1", 0x1C0, 0, 0),
]
ETEXT = 0x200


def build_pclntab(funcs: list[tuple[str, int, int, int]] = FUNCS, etext: int = ETEXT, text_start: int = 0) -> bytes:
    """A Go 1.20+ pcHeader, funcname table and functab + _func records, laid out like the linker's."""
    names = b""
    name_offs = []
    for name, *_ in funcs:
        name_offs.append(len(names))
        names += name.encode() + b"\0"
    header_size = 8 + 8 * 8
    funcname_off = header_size
    cu_off = filetab_off = pctab_off = funcname_off + len(names)
    pcln_off = (pctab_off + 7) // 8 * 8
    functab_size = (len(funcs) + 1) * 8
    funcs_blob = b""
    pairs = []
    for (_name, entry, func_id, flag), name_off in zip(funcs, name_offs, strict=True):
        pairs.append((entry, functab_size + len(funcs_blob)))
        # entryOff, nameOff, args, deferreturn, pcsp, pcfile, pcln, npcdata, cuOffset, startLine,
        # funcID, flag, pad, nfuncdata
        funcs_blob += struct.pack("<Ii7IiBBBB", entry, name_off, 0, 0, 0, 0, 0, 0, 0, 1, func_id, flag, 0, 0)
    pairs.append((etext, 0))
    header = struct.pack("<IBBBB", GO120_PCLNTAB_MAGIC, 0, 0, 1, 8)
    header += struct.pack("<8Q", len(funcs), 1, text_start, funcname_off, cu_off, filetab_off, pctab_off, pcln_off)
    blob = header + names
    blob += b"\0" * (pcln_off - len(blob))
    blob += b"".join(struct.pack("<II", *p) for p in pairs) + funcs_blob
    return blob


# --- pclntab parser --------------------------------------------------------------------------


def test_header_fields() -> None:
    hdr = parse_pclntab_header(build_pclntab(text_start=0x401000))
    assert (hdr.nfunc, hdr.ptr_size, hdr.min_lc, hdr.text_start) == (len(FUNCS), 8, 1, 0x401000)
    assert hdr.funcname_offset == 72
    assert hdr.pcln_offset % 8 == 0


def test_functions_names_entries_sizes() -> None:
    funcs = list(iter_pclntab_functions(build_pclntab()))
    assert [f.name for f in funcs][:2] == [
        "runtime.text.first",
        "github.com/ollama/ollama/server.(*Server).GenerateHandler",
    ]
    assert [f.entry for f in funcs] == [e for _, e, _, _ in FUNCS]
    assert funcs[1].size == 0x100 - 0x40
    assert funcs[-1].size == ETEXT - 0x1C0  # the last one ends at the etext sentinel
    assert (funcs[2].flag, funcs[4].func_id) == (FLAG_ASM, WRAPPER)
    assert funcs[-1].name == "type:.eq.net.result[int].1"  # "·" written as "." like .symtab


def test_table_at_an_offset_inside_a_larger_buffer() -> None:
    blob = b"\x55" * 24 + build_pclntab() + b"\x66" * 16
    funcs = list(iter_pclntab_functions(blob, 24))
    assert funcs[1].name.endswith("GenerateHandler") and funcs[1].entry == 0x40


def test_abi0_names_match_symtab_convention() -> None:
    names = pclntab_symbol_names(list(iter_pclntab_functions(build_pclntab())))
    assert names[2] == "runtime.reflectcall.abi0"  # the assembly body
    assert names[5] == "runtime.reflectcall"  # its ABIInternal wrapper
    assert names[3] == "runtime.osinit"  # the Go body
    assert names[4] == "runtime.osinit.abi0"  # its ABI0 wrapper
    assert names[1] == FUNCS[1][0]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ((0, struct.pack("<I", 0xFFFFFFF0)), "magic"),
        ((7, b"\x04"), "implausible header"),  # ptrSize 4
        ((8, struct.pack("<Q", 0)), "implausible counts"),  # nfunc 0
        ((8 + 8 * 3, struct.pack("<Q", 10**9)), "offsets"),  # funcnameOffset past the end
    ],
)
def test_header_sanity_checks(patch: tuple[int, bytes], message: str) -> None:
    blob = bytearray(build_pclntab())
    pos, data = patch
    blob[pos : pos + len(data)] = data
    with pytest.raises(ValueError, match=message):
        parse_pclntab_header(bytes(blob))


def test_truncated_table_is_rejected() -> None:
    with pytest.raises(ValueError):
        parse_pclntab_header(build_pclntab()[:40])
    blob = build_pclntab()
    hdr = parse_pclntab_header(blob)
    with pytest.raises(ValueError, match="function table"):
        parse_pclntab_header(blob, limit=hdr.pcln_offset + 8)


def test_mismatched_func_entry_is_rejected() -> None:
    blob = bytearray(build_pclntab())
    hdr = parse_pclntab_header(bytes(blob))
    (_, funcoff) = struct.unpack_from("<II", blob, hdr.pcln_offset)
    struct.pack_into("<I", blob, hdr.pcln_offset + funcoff, 0x999)
    with pytest.raises(ValueError, match="does not match"):
        list(iter_pclntab_functions(bytes(blob)))


def test_duplicate_groups_without_asm_flag_name_the_later_one_abi0() -> None:
    funcs = [PclnFunc("reflect.callReflect", 0, 10, WRAPPER, 0), PclnFunc("reflect.callReflect", 64, 10, WRAPPER, 0)]
    assert pclntab_symbol_names(funcs) == ["reflect.callReflect", "reflect.callReflect.abi0"]


# --- synthetic ELF files ----------------------------------------------------------------------

BASE = 0x400000  # one PT_LOAD maps the whole file at BASE: vaddr = BASE + file offset
TEXT_SECTION = BASE + 0x1000  # .text starts with C code in cgo binaries...
TEXT = BASE + 0x1100  # ...so the Go text (runtime.text) starts later


def build_elf(
    *,
    pcln_section: str | None = ".gopclntab",
    text_in_header: bool = False,
    moduledata: bool = True,
    pie: bool = False,
    symtab: list[tuple[str, int, int]] | None = None,
    machine: int = 62,
    ei_class: int = 2,
) -> bytes:
    """An ELF64 x86-64 file with .text, a pclntab (in ``pcln_section``, or inside .rodata when None),
    optionally a .go.module holding runtime.moduledata, and optionally a .symtab of FUNC symbols."""
    sections: list[tuple[str, int, int, bytes, int, int]] = []  # name, type, flags, data, link, entsize
    sections.append((".text", 1, 0x6, b"\xcc" * 0x300, 0, 0))
    pcln = build_pclntab(text_start=TEXT if text_in_header else 0)
    if pcln_section is None:
        sections.append((".rodata", 1, 0x2, b"\xf1\xff\xff\xff" + b"\0" * 12 + pcln, 0, 0))
    else:
        sections.append((pcln_section, 1, 0x2, pcln, 0, 0))
    if moduledata:
        sections.append((".go.module", 1, 0x3, b"\0" * _MD_SIZE, 0, 0))  # filled in once addresses are known
        if pie:
            sections.append((".rela.dyn", 4, 0x2, b"\0" * 24 * 4, 0, 24))
    if symtab is not None:
        strtab = b"\0"
        syms = b"\0" * 24
        for name, value, size in symtab:
            syms += struct.pack("<IBBHQQ", len(strtab), (1 << 4) | 2, 0, 1, value, size)
            strtab += name.encode() + b"\0"
        n = len(sections)
        sections.append((".symtab", 2, 0, syms, n + 2, 24))  # link: .strtab, index after null + n
        sections.append((".strtab", 3, 0, strtab, 0, 0))

    def layout() -> tuple[bytes, list[int]]:
        body = b""
        offs = []
        pos = 0x1000  # header and phdr first; .text at 0x1000
        for _name, _t, _f, data, _l, _e in sections:
            offs.append(pos)
            body += b"\0" * (pos - 0x1000 - len(body)) + data
            pos = (0x1000 + len(body) + 15) // 16 * 16
        return body, offs

    _, offs = layout()
    if moduledata:
        pcln_idx = 1
        pcln_addr = BASE + offs[pcln_idx] + (16 if pcln_section is None else 0)
        hdr = parse_pclntab_header(pcln)
        md = struct.pack("<Q", pcln_addr)
        md += struct.pack("<3Q", pcln_addr + hdr.funcname_offset, 10, 10)  # funcnametab slice
        md += b"\0" * 24 * 4  # cutab, filetab, pctab, pclntable
        md += struct.pack("<3Q", pcln_addr + hdr.pcln_offset, 8, 8)  # ftab slice
        md += struct.pack("<4Q", 0, TEXT, TEXT + ETEXT, TEXT)  # findfunctab, minpc, maxpc, text
        md += b"\0" * 64
        i = [s[0] for s in sections].index(".go.module")
        assert len(md) == _MD_SIZE
        if pie:  # PIE: the pointers are zero in the file, filled in by R_X86_64_RELATIVE relocations
            md_addr = BASE + offs[i]
            relocs = [(0, pcln_addr), (8, pcln_addr + hdr.funcname_offset), (128, pcln_addr + hdr.pcln_offset)]
            relocs.append((176, TEXT))
            rela = b"".join(struct.pack("<QQq", md_addr + off, 8, value) for off, value in relocs)
            sections[i + 1] = (".rela.dyn", 4, 0x2, rela, 0, 24)
            md = b"\0" * _MD_SIZE
        sections[i] = (".go.module", 1, 0x3, md, 0, 0)
    body, offs = layout()
    shstr = b"\0"
    name_offs = []
    for name in [s[0] for s in sections] + [".shstrtab"]:
        name_offs.append(len(shstr))
        shstr += name.encode() + b"\0"
    shstr_off = 0x1000 + len(body)
    body += shstr
    shoff = (0x1000 + len(body) + 7) // 8 * 8
    body += b"\0" * (shoff - 0x1000 - len(body))
    shdrs = b"\0" * 64
    for (_name, typ, flags, data, link, entsize), noff, off in zip(sections, name_offs, offs, strict=False):
        addr = BASE + off if flags & 0x2 else 0
        shdrs += struct.pack("<IIQQQQIIQQ", noff, typ, flags, addr, off, len(data), link, 0, 8, entsize)
    shdrs += struct.pack("<IIQQQQIIQQ", name_offs[-1], 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    shnum = len(sections) + 2
    ident = b"\x7fELF" + bytes([ei_class, 1, 1]) + b"\0" * 9
    total = 0x1000 + len(body) + len(shdrs)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, TEXT, 64, shoff, 0, 64, 56, 1, 64, shnum, shnum - 1)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, BASE, BASE, total, total, 0x1000)
    head = ehdr + phdr
    return head + b"\0" * (0x1000 - len(head)) + body + shdrs


def _write(tmp_path: Path, data: bytes, name: str = "bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


_MD_SIZE = 8 + 6 * 24 + 4 * 8 + 64  # pcHeader, six slices, findfunctab, minpc, maxpc, text, rest


def _addr(table: SymbolTable, name: str) -> int:
    sym = table.lookup(name)
    assert sym is not None, name
    return sym.address


HANDLER = "github.com/ollama/ollama/server.(*Server).GenerateHandler"


def test_stripped_go_binary_resolves_via_pclntab_and_moduledata(tmp_path: Path) -> None:
    table = SymbolTable.load(_write(tmp_path, build_elf()))
    assert table.stripped
    assert table.go_text_start == TEXT
    sym = table.lookup(HANDLER)
    assert sym == Symbol(HANDLER, TEXT + 0x40, 0xC0, "gopclntab")
    assert table.lookup("runtime.reflectcall.abi0") == Symbol(
        "runtime.reflectcall.abi0", TEXT + 0x100, 0x40, "gopclntab"
    )
    assert table.lookup("runtime.reflectcall") is not None
    assert _addr(table, "runtime.reflectcall") == TEXT + 0x1A0
    assert sym is not None and table.file_offset(sym.address) == sym.address - BASE


def test_text_start_from_header_when_stored(tmp_path: Path) -> None:
    table = SymbolTable.load(_write(tmp_path, build_elf(text_in_header=True, moduledata=False)))
    assert _addr(table, HANDLER) == TEXT + 0x40


def test_text_start_falls_back_to_text_section(tmp_path: Path) -> None:
    # No header field, no moduledata, no runtime.text symbol: .text's address is the last resort
    # (right for internally linked binaries; cgo binaries put C code first).
    table = SymbolTable.load(_write(tmp_path, build_elf(moduledata=False)))
    assert table.go_text_start == TEXT_SECTION


def test_pie_moduledata_through_relocations(tmp_path: Path) -> None:
    table = SymbolTable.load(_write(tmp_path, build_elf(pcln_section=".data.rel.ro.gopclntab", pie=True)))
    assert table.go_text_start == TEXT
    assert _addr(table, HANDLER) == TEXT + 0x40


def test_pie_section_name(tmp_path: Path) -> None:
    table = SymbolTable.load(_write(tmp_path, build_elf(pcln_section=".data.rel.ro.gopclntab")))
    assert _addr(table, HANDLER) == TEXT + 0x40


def test_pclntab_found_by_scanning_rodata(tmp_path: Path) -> None:
    # A decoy magic at the start of .rodata fails the sanity checks; the real header follows.
    table = SymbolTable.load(_write(tmp_path, build_elf(pcln_section=None)))
    assert _addr(table, HANDLER) == TEXT + 0x40


def test_symtab_is_preferred_and_lookup_tolerates_abi0_suffix(tmp_path: Path) -> None:
    symtab = [
        (HANDLER, TEXT + 0x40, 0xA0),
        ("runtime.reflectcall.abi0", TEXT + 0x100, 0x30),
        ("c_helper", TEXT + 0x2C0, 0),
    ]
    table = SymbolTable.load(_write(tmp_path, build_elf(symtab=symtab)))
    assert not table.stripped
    assert table.lookup(HANDLER) == Symbol(HANDLER, TEXT + 0x40, 0xA0, "symtab")
    assert table.lookup("c_helper") == Symbol("c_helper", TEXT + 0x2C0, None, "symtab")
    # pclntab has the bare name; .symtab (like `go tool nm`) the .abi0 one: both spellings resolve.
    assert table.lookup("internal/nothing.abi0") is None
    found, missing = table.resolve_many([HANDLER, "runtime.osinit.abi0", "nope", "nope"])
    assert set(found) == {HANDLER, "runtime.osinit.abi0"}
    assert missing == ["nope"]
    assert table.function_at(TEXT + 0x40 + 0x9F) == HANDLER
    assert table.function_at(TEXT + 0x2C0 + 5) == "c_helper"  # size unknown: up to the next function


def test_function_at_boundaries(tmp_path: Path) -> None:
    table = SymbolTable.load(_write(tmp_path, build_elf()))
    assert table.function_at(TEXT - 1) is None
    assert table.function_at(TEXT) == "runtime.text.first"
    assert table.function_at(TEXT + 0x3F) == "runtime.text.first"
    assert table.function_at(TEXT + 0x40) == HANDLER
    assert table.function_at(TEXT + 0x180) == "runtime.osinit.abi0"
    assert table.function_at(TEXT + ETEXT - 1) == "type:.eq.net.result[int].1"
    assert table.function_at(TEXT + ETEXT) is None


def test_lookup_normalises_middle_dot(tmp_path: Path) -> None:
    table = SymbolTable.load(_write(tmp_path, build_elf()))
    assert table.lookup("type:.eq.net.result[int]·1") is not None


def test_file_offset_outside_segments(tmp_path: Path) -> None:
    table = SymbolTable.load(_write(tmp_path, build_elf()))
    with pytest.raises(ValueError, match="not in any"):
        table.file_offset(0x10)


def test_symbol_table_from_symbols_directly() -> None:
    syms = [
        Symbol("b", 0x2000, 0x10, "symtab"),
        Symbol("a", 0x1000, None, "dynsym"),
        Symbol("a", 0x1000, 8, "gopclntab"),
    ]
    table = SymbolTable(Path("x"), syms, [], has_symtab=True)
    assert table.lookup("a") == Symbol("a", 0x1000, 8, "gopclntab")  # gopclntab beats dynsym
    assert table.function_at(0x1007) == "a"
    assert table.function_at(0x1008) is None
    assert table.function_at(0x200F) == "b"
    assert len(table) == 2


# --- rejection of other files -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an ELF"),
        (b"#!/bin/sh\necho hi\n" + b"\0" * 64, "not an ELF"),
    ],
)
def test_not_elf(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SymbolTable.load(_write(tmp_path, data))


def test_wrong_machine_or_class(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ELF64 little-endian x86-64"):
        SymbolTable.load(_write(tmp_path, build_elf(machine=183)))  # aarch64
    with pytest.raises(ValueError, match="ELF64 little-endian x86-64"):
        SymbolTable.load(_write(tmp_path, build_elf(ei_class=1)))


# --- real system binaries ---------------------------------------------------------------------

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")


@pytest.mark.skipif(not Path("/bin/true").exists(), reason="no /bin/true")
def test_bin_true_is_stripped_and_parses() -> None:
    table = SymbolTable.load(Path("/bin/true"))
    assert table.stripped  # Debian strips its binaries
    assert table.go_text_start is None
    assert table.lookup("main") is None
    assert table.lookup("getenv") is None  # imported, not defined: undefined dynsym entries are skipped


@pytest.mark.skipif(not LIBC.exists(), reason="no Debian x86-64 libc")
def test_libc_dynsym_lookup() -> None:
    table = SymbolTable.load(LIBC)
    sym = table.lookup("malloc")
    assert sym is not None and sym.source == "dynsym" and sym.size
    assert table.function_at(sym.address + 1) in {"malloc", "__libc_malloc"}
    found, missing = table.resolve_many(["malloc", "free", "no_such_function_xyz"])
    assert set(found) == {"malloc", "free"} and missing == ["no_such_function_xyz"]
    # The bytes at the file offset are the function's code: same as mapping through the segments.
    with LIBC.open("rb") as fh:
        fh.seek(table.file_offset(sym.address))
        assert len(fh.read(16)) == 16


def test_damaged_pclntab_keeps_symtab(tmp_path: Path) -> None:
    data = bytearray(build_elf(symtab=[(HANDLER, TEXT + 0x40, 0xA0)]))
    start = data.index(struct.pack("<I", GO120_PCLNTAB_MAGIC) + b"\0\0\x01\x08")
    hdr = parse_pclntab_header(bytes(data), start)
    (_, funcoff) = struct.unpack_from("<II", data, start + hdr.pcln_offset)
    struct.pack_into("<I", data, start + hdr.pcln_offset + funcoff, 0x999)  # _func.entryOff disagrees
    table = SymbolTable.load(_write(tmp_path, bytes(data)))
    assert table.pclntab_error is not None and "does not match" in table.pclntab_error
    assert table.go_text_start is None
    assert table.lookup(HANDLER) == Symbol(HANDLER, TEXT + 0x40, 0xA0, "symtab")
