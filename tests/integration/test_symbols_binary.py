"""Symbol resolution on the testbed's real Ollama binary, and on a stripped copy of it."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from ollama_tracer.collectors.symbols import SymbolTable

pytestmark = pytest.mark.integration

OLLAMA = Path.home() / ".cache/ollama-tracer/bin/ollama-0.13.5"
HANDLER = "github.com/ollama/ollama/server.(*Server).GenerateHandler"


@pytest.fixture(scope="module")
def unstripped() -> SymbolTable:
    if not OLLAMA.exists():
        pytest.skip(f"{OLLAMA} not built (run `tracer testbed up`)")
    return SymbolTable.load(OLLAMA)


@pytest.fixture(scope="module")
def stripped(tmp_path_factory: pytest.TempPathFactory) -> SymbolTable:
    if not OLLAMA.exists():
        pytest.skip(f"{OLLAMA} not built (run `tracer testbed up`)")
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy not installed (binutils)")
    copy = tmp_path_factory.mktemp("stripped") / "ollama-stripped"
    subprocess.run(["objcopy", "--strip-all", str(OLLAMA), str(copy)], check=True, timeout=120)
    return SymbolTable.load(copy)


def _go_nm() -> dict[str, set[int]]:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        pytest.skip("go toolchain not installed")
    out = subprocess.run([go, "tool", "nm", str(OLLAMA)], capture_output=True, text=True, check=True, timeout=120)
    names: dict[str, set[int]] = {}
    for line in out.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] in ("T", "t"):
            names.setdefault(parts[2].strip(), set()).add(int(parts[0], 16))
    return names


def test_handler_same_address_from_symtab_and_gopclntab(unstripped: SymbolTable, stripped: SymbolTable) -> None:
    assert not unstripped.stripped and stripped.stripped
    a, b = unstripped.lookup(HANDLER), stripped.lookup(HANDLER)
    assert a is not None and a.source == "symtab"
    assert b is not None and b.source == "gopclntab"
    assert a.address == b.address == 0x111F1E0
    assert unstripped.function_at(a.address + 100) == HANDLER
    assert stripped.function_at(a.address + 100) == HANDLER


def test_c_symbols_only_in_unstripped(unstripped: SymbolTable, stripped: SymbolTable) -> None:
    sym = unstripped.lookup("llama_decode")
    assert sym is not None and sym.source == "symtab"
    assert stripped.lookup("llama_decode") is None
    found, missing = stripped.resolve_many([HANDLER, "llama_decode"])
    assert list(found) == [HANDLER] and missing == ["llama_decode"]


def test_gopclntab_matches_go_tool_nm(stripped: SymbolTable) -> None:
    nm = _go_nm()
    text = stripped.go_text_start
    assert text is not None
    # Every Go function `go tool nm` lists (inside the Go text) resolves to the same address.
    etext = min(nm["runtime.etext"])
    go_names = [n for n, addrs in nm.items() if all(text <= a < etext for a in addrs) and n != "runtime.text"]
    assert len(go_names) > 20_000
    wrong = [n for n in go_names if (s := stripped.lookup(n)) is None or s.address not in nm[n]]
    assert wrong == []
    sample = random.Random(0).sample(go_names, 50)
    for name in sample:
        sym = stripped.lookup(name)
        assert sym is not None and sym.address in nm[name], name


def test_file_offset_through_load_segments(unstripped: SymbolTable) -> None:
    sym = unstripped.lookup(HANDLER)
    assert sym is not None
    off = unstripped.file_offset(sym.address)
    assert off == 0xD1F1E0  # text segment: vaddr 0x40c000 at file offset 0xc000
    with OLLAMA.open("rb") as fh:
        fh.seek(off)
        code = fh.read(4)
    # Go's amd64 prologue starts with the stack-bound check: cmp rsp, [r14+0x10] (49 3b 66 10),
    # or a lea into r12 for big frames (4c 8d 64 24).
    assert code[:2] in (b"\x49\x3b", b"\x4c\x8d")


def test_load_is_fast(unstripped: SymbolTable) -> None:
    start = time.perf_counter()
    SymbolTable.load(OLLAMA)
    assert time.perf_counter() - start < 3.0
