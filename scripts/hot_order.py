#!/usr/bin/env python3
"""The link order of meshtun's packet path.

A ping through the tunnel wakes each end from idle, with cold caches and
TLBs: what a wake-up costs then depends on how many code lines and pages
the packet path touches. Linked in the compiler's order, the path's
functions lie scattered over the 4 MB of text. bench/hot-path.functions
names them, hottest first, as a profile saw them; bench/hot-path.order is
that list as the binary's mangled symbols, which build.rs hands to lld
(--symbol-ordering-file) for release builds, so they lie together.

Mangled names carry hashes that change with the crate's dependencies, so
the order file is derived and refreshed; the function list is not.

  scripts/hot_order.py profile CALLGRIND_OUT > bench/hot-path.functions
      every function a callgrind profile saw run, by instructions run
      (how to take it: bench/README.md, "Link order")
  scripts/hot_order.py refresh BINARY
      rewrites bench/hot-path.order from the function list and BINARY's
      symbols (then build again: the link uses the new order)
  scripts/hot_order.py check BINARY
      how many of the order file's symbols BINARY has; exits 1 when fewer
      than half (stale: refresh it)
"""
import collections
import re
import subprocess
import sys

FUNCTIONS_FILE = "bench/hot-path.functions"
ORDER_FILE = "bench/hot-path.order"
MAX_INSTANCES = 4
# The engine's loop, entered once; the profile counts only inside it.
LOOP = "meshtun::engine::Engine::run"
# A ping run calls the packet path's functions thousands of times.
MIN_CALLS = 100
HASH = re.compile(r"::h[0-9a-f]{16}$")


def symbols(binary):
    """Mangled text symbols of `binary`, keyed by demangled name without hash."""
    def nm(*flags):
        out = subprocess.run(["nm", *flags, binary], check=True, capture_output=True, text=True).stdout
        return [line.split(" ", 2) for line in out.splitlines()]
    by_name = collections.defaultdict(list)
    for plain, pretty in zip(nm(), nm("-C")):
        if len(plain) == 3 and plain[1] in "tTwW":
            by_name[HASH.sub("", pretty[2])].append(plain[2])
    return by_name


def profile_costs(path):
    """Instructions each function ran (self cost) and how often it was
    called, from a callgrind output."""
    costs, calls = collections.Counter(), collections.Counter()
    fn, positions, skip, callee = None, 1, False, None
    names = {}

    def name(field):
        # Compressed names: "(12) name" defines, "(12)" refers; fn= and
        # cfn= lines share the table.
        m = re.match(r"\((\d+)\)(?: (.*))?$", field)
        if not m:
            return field
        if m.group(2) is not None:
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), "")

    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("positions:"):
            positions = len(line.split()) - 1
        elif line.startswith("fn="):
            fn = name(line[3:])
        elif line.startswith("cfn="):
            callee = name(line[4:])
        elif line.startswith("calls="):
            calls[callee] += int(line[6:].split()[0])
            skip = True
        elif line[:1].isdigit() or line[:1] in "+-*" or line.startswith("0x"):
            if skip:
                skip = False
                continue
            parts = line.split()
            if fn is not None and len(parts) > positions:
                costs[fn] += int(parts[positions])
    return costs, calls


def profile(path):
    """The loop and what it calls over and over, by instructions run: a
    function called only a few times (a handshake's key exchange) is not
    on the packet path however much it costs."""
    costs, calls = profile_costs(path)
    for fn, cost in costs.most_common():
        if fn and cost > 0 and (fn == LOOP or calls[fn] >= MIN_CALLS):
            print(fn)


def refresh(binary):
    by_name = symbols(binary)
    names = [line.strip() for line in open(FUNCTIONS_FILE) if line.strip()]
    # A generic function's name stands for all its instances, most of them
    # never on the path: names with many are left out.
    order = [symbol for name in names if len(by_name.get(name, [])) <= MAX_INSTANCES for symbol in by_name[name]]
    with open(ORDER_FILE, "w") as out:
        out.write("".join(f"{symbol}\n" for symbol in order))
    print(f"{ORDER_FILE}: {len(order)} symbols for {len(names)} functions of {FUNCTIONS_FILE}")


def check(binary):
    have = {s for names in symbols(binary).values() for s in names}
    listed = [line.strip() for line in open(ORDER_FILE) if line.strip()]
    found = sum(1 for s in listed if s in have)
    print(f"{ORDER_FILE}: {found} of {len(listed)} symbols are in {binary}")
    if found * 2 < len(listed):
        print(f"the link order went stale: run scripts/hot_order.py refresh {binary}, then build again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "profile":
        profile(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "refresh":
        refresh(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "check":
        sys.exit(check(sys.argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
