#!/usr/bin/env python3
"""Checks that the files of src/ import each other as a DAG.

Every source file is a node (`paging::walker`, `paging` for
paging/mod.rs, `paging::x86` for paging/x86.rs). An edge A -> B is a path
in A that names something B defines: `crate::m::f::Item`, `super::f::Item`,
`self::f`, a child module named bare in a module root, or an item a module
root only re-exports (`pub use walker::Item` makes `super::Item` point at
walker.rs, not at the root). A module root's own `pub use` lines are its
facade and are not edges; `#[cfg(test)]` modules are left out (a file's
tests may use anything above it).

With no cycle among files there is none among the top-level modules either
(`../shared/tools/layers.py` checks those alone). Prints the order of the
files, bottom first, with `-v`; exits 1 and prints each cycle otherwise.

    python3 .ci/file_layers.py [-v] [SRC_DIR]
"""
import os
import re
import sys

args = [a for a in sys.argv[1:] if a != "-v"]
verbose = "-v" in sys.argv[1:]
SRC = args[0] if args else "src"

# --- nodes -----------------------------------------------------------------
files = {}  # node -> path
for root, _, names in os.walk(SRC):
    for n in names:
        if not n.endswith(".rs"):
            continue
        rel = os.path.relpath(os.path.join(root, n), SRC)[:-3].split(os.sep)
        if rel == ["lib"] or rel == ["main"]:
            node = ""
        elif rel[-1] == "mod":
            node = "::".join(rel[:-1])
        else:
            node = "::".join(rel)
        files[node] = os.path.join(root, n)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def strip_strings(text):
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


def block_end(text, open_brace):
    depth = 0
    for k in range(open_brace, len(text)):
        c = text[k]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return k + 1
    return len(text)


def split_inline_modules(text):
    """(outer text, [inline module bodies]) with test modules dropped."""
    inner = []
    out = []
    i = 0
    pat = re.compile(r"(#\[cfg\(test\)\]\s*)?(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*\{")
    while True:
        m = pat.search(text, i)
        if not m:
            out.append(text[i:])
            break
        out.append(text[i:m.start()])
        end = block_end(text, m.end() - 1)
        body = text[m.end():end - 1]
        is_test = m.group(1) is not None or re.match(r".*mod\s+\w*tests\s*\{", m.group(0))
        if not is_test:
            inner.append(body)
        i = end
    return "".join(out), inner


def expand(path):
    """`a::{b, c::{d}}` -> ["a::b", "a::c::d"]."""
    path = re.sub(r"\s+", "", path)
    i = path.find("{")
    if i < 0:
        return [path]
    end = block_end(path, i)
    head, body, tail = path[:i], path[i + 1:end - 1], path[end:]
    items, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    items.append(cur)
    return [e + tail for it in items if it for e in expand(head + it)]


PATH = re.compile(r"\b((?:crate|super|self)(?:::(?:\w+|\{))+)")


def paths_in(text):
    """Every path starting with crate/super/self, groups expanded."""
    out = []
    for m in PATH.finditer(text):
        start = m.start()
        s = m.group(1)
        if s.endswith("{"):
            end = block_end(text, start + len(s) - 1)
            s = text[start:end]
        out.extend(expand(s))
    return out


def children(node):
    pre = node + "::" if node else ""
    return {n[len(pre):] for n in files if n.startswith(pre) and n != node and "::" not in n[len(pre):]}


# --- re-exports of module roots ----------------------------------------------
reexports = {}  # node -> {name: node path list as written}
texts = {}
for node, path in files.items():
    with open(path, encoding="utf-8") as f:
        t = strip_strings(strip_comments(f.read()))
    outer, inner = split_inline_modules(t)
    texts[node] = (outer, inner)
    ex = {}
    for m in re.finditer(r"pub(?:\([a-z]+\))?\s+use\s+([^;]+);", outer):
        for p in expand(m.group(1)):
            p = re.sub(r"\bas\s+\w+$", "", p).strip(":")
            name = p.split("::")[-1]
            ex[name] = p
    reexports[node] = ex


def absolute(node, p, in_root):
    """The path p written in file `node` as a list of crate-level segments."""
    segs = p.split("::")
    mod = node.split("::") if node else []
    # A file that is not a module root sits in its parent's namespace for
    # `super`, but its own for `self`.
    if segs[0] == "crate":
        return segs[1:]
    if segs[0] == "self":
        return mod + segs[1:]
    base = list(mod)
    while segs and segs[0] == "super":
        base = base[:-1]
        segs = segs[1:]
    return base + segs


def resolve(segs, depth=0):
    """The file node that defines the item named by crate-level `segs`."""
    node = ""
    i = 0
    while i < len(segs):
        cand = (node + "::" + segs[i]) if node else segs[i]
        if cand in files:
            node = cand
            i += 1
            continue
        break
    if i < len(segs) and depth < 8:
        name = segs[i]
        ex = reexports.get(node, {}).get(name)
        if ex is not None:
            return resolve(absolute(node, ex, True) if ex.split("::")[0] in ("crate", "self", "super")
                           else (node.split("::") if node else []) + ex.split("::"), depth + 1)
    return node


edges = {n: {} for n in files}
for node, (outer, inner) in texts.items():
    text = outer
    if node == "" or children(node):
        # A module root: its `pub use` lines are the facade, not edges.
        text = re.sub(r"pub(?:\([a-z]+\))?\s+use\s+[^;]+;", "", outer)
    found = paths_in(text)
    # Bare child names in a module root (`use walker::X;`, `walker::f()`).
    for c in children(node):
        if re.search(r"(?<![\w:])" + re.escape(c) + r"::", text):
            found.append("self::" + c)
    for body in inner:
        found.extend(p for p in paths_in(body) if not p.startswith("super::"))
    for p in found:
        target = resolve(absolute(node, p, False))
        if target != node and target in files and target != "":
            edges[node].setdefault(target, p)

# --- cycles ------------------------------------------------------------------
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        sccs.append(comp)


for v in sorted(edges):
    if v not in index:
        strong(v)

cycles = [c for c in sccs if len(c) > 1]
if verbose:
    # Tarjan emits components in reverse topological order: bottom first.
    for c in sccs:
        for v in c:
            if v:
                deps = ", ".join(sorted(edges[v]))
                print(f"{v or 'lib'} -> {deps}" if deps else f"{v}")
if cycles:
    for c in cycles:
        members = set(c)
        print("cycle among files: " + ", ".join(files[v] for v in sorted(members)))
        for v in sorted(members):
            for w, p in sorted(edges[v].items()):
                if w in members:
                    print(f"  {files[v]} -> {files[w]}  ({p})")
    sys.exit(1)
print(f"{len(files) - 1} files of {SRC}/ import each other as a DAG")
