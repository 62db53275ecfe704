#!/usr/bin/env python3
"""The library's module graph: which top-level module of src/ uses which.

Prints one line per module with the modules it uses, then fails (exit 1)
naming the modules of any cycle. Modules must point one way (see
ARCHITECTURE.md). Reads `crate::<module>` paths in code (comments, doc
links and test modules aside), so it needs no build.

    python3 scripts/modgraph.py            # the graph, or the cycle
"""
import collections
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"


def modules():
    """Top-level library modules and their files (the binary aside)."""
    found = collections.defaultdict(list)
    for path in SRC.rglob("*.rs"):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "bin" or rel.name == "lib.rs":
            continue
        found[rel.parts[0].removesuffix(".rs")].append(path)
    return found


def uses(text, names):
    """The top-level modules a file's code names as `crate::<module>`."""
    text = re.split(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)[0]
    text = re.sub(r"//[^\n]*", "", text)
    used = set(re.findall(r"crate::(\w+)", text))
    for group in re.findall(r"crate::\{([^;]*)\};", text):
        used.update(re.findall(r"(?:^|[{,])\s*(\w+)", group))
    return used & names


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    files = modules()
    names = set(files)
    graph = {m: set() for m in names}
    for module, paths in files.items():
        for path in paths:
            graph[module] |= uses(path.read_text(), names) - {module}
    for module in sorted(graph):
        print(f"{module:10} -> {', '.join(sorted(graph[module])) or '-'}")
    found = cycles(graph)
    for component in found:
        print("cycle:", " <-> ".join(component), file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
