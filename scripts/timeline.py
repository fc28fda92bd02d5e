#!/usr/bin/env python3
"""Reads a timeline of agentd's durable-enqueue cycle (AGENTD_TIMELINE=FILE in
agentd's environment; crates/store/src/timeline.rs) and prints where the time goes.

Usage: scripts/timeline.py FILE [SAMPLES]

A cycle runs from the end of one sync's completions ('released') to the end of the
next one's. The first and last tenth of the events are left out (start and end of
the run). Printed: the rate the released ops make over that span; the share of time
the writer commits, the syncer is in fdatasync and calls completions, and how much
commits overlap syncs; commit cost (fixed + per op); the hand-offs between threads
(the last hand-over to the writer awake, the first commit of a sync ended to the
sync taken, fdatasync ended to its completions done); each stage's first/last time
within a cycle (median and p10/p90, in us after the cycle began); the CPUs each
stage was marked on; and SAMPLES whole cycles (default 4), each a run of marks
'stage x count (arg sum) @ first-last us'."""
import statistics as st
import sys

path = sys.argv[1]
samples = int(sys.argv[2]) if len(sys.argv) > 2 else 4
ev = []
for line in open(path):
    p = line.split()
    ev.append((int(p[0]), p[1], int(p[2]), int(p[3]), int(p[4])))
ev.sort()
ev = ev[len(ev) // 10: len(ev) - len(ev) // 10]
span = ev[-1][0] - ev[0][0]

commits, syncs, rels = [], [], []
c0 = s0 = s1 = None
for ns, s, a, _tid, _cpu in ev:
    if s == "c0":
        c0 = (ns, a)
    elif s == "c1" and c0:
        commits.append((c0[0], ns, a))
        c0 = None
    elif s == "s0":
        s0 = ns
    elif s == "s1" and s0:
        syncs.append((s0, ns))
        s1, s0 = ns, None
    elif s == "released" and s1:
        rels.append((s1, ns, a))
        s1 = None


def total(iv):
    return sum(b - a for a, b, *_ in iv)


def overlap(xs, ys):
    return sum(max(0, min(a1, b1) - max(a0, b0)) for a0, a1, *_ in xs for b0, b1 in ys
               if b1 >= a0 and b0 <= a1)


ops = sum(r[2] for r in rels)
print(f"{span / 1e6:.1f} ms, {ops} ops released: {ops / span * 1e9:.0f}/s")
print(f"writer committing {100 * total(commits) / span:.0f}%, fdatasync {100 * total(syncs) / span:.0f}%, "
      f"completions {100 * total(rels) / span:.0f}%, commits beside a sync {100 * overlap(commits, syncs) / span:.0f}%")
if len(commits) > 2:
    xs = [c[2] for c in commits]
    ys = [(c[1] - c[0]) / 1e3 for c in commits]
    mx, my = st.mean(xs), st.mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0
    print(f"{len(commits)} commits ({len(commits) / max(1, len(syncs)):.2f} per sync), median {st.median(xs)} ops, "
          f"{st.median(ys):.0f} us; fit {my - slope * mx:.0f} us + {slope:.2f} us/op")
if len(syncs) > 2:
    d = [(b - a) / 1e3 for a, b in syncs]
    print(f"{len(syncs)} syncs: fdatasync median {st.median(d):.0f} us, p90 {st.quantiles(d, n=10)[-1]:.0f}; "
          f"ops per sync median {st.median([r[2] for r in rels])}")


def waits(frm, to, first):
    """From a `frm` mark to the next `to` mark: the first `frm` since the last `to`
    (how long the earliest waited), or the last one (the wake-up's latency)."""
    out, start = [], None
    for ns, s, *_ in ev:
        if s == frm and (start is None or not first):
            start = ns
        elif s == to and start is not None:
            out.append((ns - start) / 1e3)
            start = None
    return out


# The hand-offs between threads (a wake-up, or a thread waiting for a CPU, shows
# here), and the completions that run in series after each fdatasync.
for label, frm, to, first in [("last hand-over -> writer awake", "hand", "woke", False),
                              ("first commit of a sync ended -> sync taken", "c1", "taken", True),
                              ("fdatasync ended -> completions done", "s1", "released", True)]:
    d = waits(frm, to, first)
    if len(d) > 2:
        print(f"{label}: median {st.median(d):.0f} us, p90 {st.quantiles(d, n=10)[-1]:.0f}")

cycles = []
marks = [i for i, e in enumerate(ev) if e[1] == "released"]
for a, b in zip(marks, marks[1:]):
    t0 = ev[a][0]
    d = {}
    for ns, s, arg, _tid, _cpu in ev[a + 1: b + 1]:
        d.setdefault(s, []).append((ns - t0, arg))
    cycles.append(d)
print(f"{len(cycles)} cycles; per stage, us after the cycle began: p10 / median / p90")
for s in ["relayed", "wrote", "read", "loop", "hand", "woke", "waited", "c0", "c1", "taken", "s0", "s1", "released"]:
    for which in ("first", "last"):
        vals = [d[s][0 if which == "first" else -1][0] / 1e3 for d in cycles if s in d]
        if len(vals) > 2:
            q = st.quantiles(vals, n=10)
            print(f"  {s:9s} {which:5s} {q[0]:8.0f} {st.median(vals):8.0f} {q[-1]:8.0f}   (in {len(vals)} cycles)")
cpus = {}
for _ns, s, _a, _tid, cpu in ev:
    cpus.setdefault(s, {}).setdefault(cpu, 0)
    cpus[s][cpu] += 1
print("CPUs:", "  ".join(f"{s} {dict(sorted(c.items()))}" for s, c in cpus.items()))
print("sample cycles:")
for d in cycles[len(cycles) // 2: len(cycles) // 2 + samples]:
    runs = []
    for t, s, a in sorted((t, s, a) for s, v in d.items() for t, a in v):
        if runs and runs[-1][0] == s:
            runs[-1][2] = t
            runs[-1][3] += 1
            runs[-1][4] += a
        else:
            runs.append([s, t, t, 1, a])
    print("  " + " ".join(f"{s}x{n}({a})@{t0 / 1e3:.0f}-{t1 / 1e3:.0f}" if n > 1 else f"{s}({a})@{t0 / 1e3:.0f}"
                          for s, t0, t1, n, a in runs))
