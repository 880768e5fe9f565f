"""How the tunnel benchmark measures and reports: interleaved rounds, medians, --profile, tables.

Every measurement of ``scenarios.py`` goes through :func:`measure`: round 1
measures every relay once, in order, then round 2, and so on, so the
machine's noise hits every relay alike; the figures are the medians of the
rounds.  With ``--profile DIR`` one more, unreported run of the same
measurement follows for each tunnelpass relay, with py-spy recording its
server and client.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import time


def interleaved(relays, ports: dict[str, int], rounds: int, one, label: str) -> dict[str, list]:
    """Round r measures every relay once, in order; name -> the per-round results of *one(port)*.

    A tunnelpass relay whose server or client has exited is left out from
    then on (``relays.failed`` says why), not measured as a relay that
    refuses every connection."""
    results = {name: [] for name in ports}
    for r in range(rounds):
        for name, port in ports.items():
            if name in relays.failed:
                continue
            if why := relays.exited(name):
                relays.leave_out(name, why)
                continue
            print(f"bench: {label} round {r + 1}/{rounds} {name}", file=sys.stderr, flush=True)
            results[name].append(one(port))
    return {name: runs for name, runs in results.items() if runs}


def measure(relays, ports: dict[str, int], rounds: int, one, label: str, profile_dir: str | None) -> dict[str, list]:
    """*one(port)* for every relay in *rounds* interleaved rounds, then the --profile run with the same call."""
    runs = interleaved(relays, ports, rounds, one, label)
    if profile_dir:
        profile(relays, {name: ports[name] for name in runs}, one, label, profile_dir)
    return runs


def profile(relays, ports: dict[str, int], one, label: str, outdir: str) -> None:
    """One extra, unreported run per tunnelpass relay with py-spy recording its server and client
    (collapsed stacks ``{label}-{relay}-{side}.txt``, and the functions taking the most samples
    printed): what limits the figure."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    os.makedirs(outdir, exist_ok=True)
    for name, pair in relays.pairs.items():
        if name not in ports:
            continue
        print(f"bench: profiling {label} {name}", file=sys.stderr, flush=True)
        outputs = {side: os.path.join(outdir, f"{label}-{name}-{side}.txt") for side in ("server", "client")}
        spies = [relays.spawn([spy, "record", "--nonblocking", "--idle", "--rate", "250", "--format", "raw",
                               "-o", outputs[side], "--pid", str(p.pid)],
                              f"py-spy-{label}-{name}-{side}.log")
                 for side, p in (("server", pair.server), ("client", pair.client))]
        time.sleep(1.0)  # attached
        one(ports[name])
        for p in spies:
            p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for p in spies:
            p.wait(60)
        for side, path in outputs.items():
            print(f"profile {label} {name} {side}: " + top_functions(path), file=sys.stderr, flush=True)


def top_functions(path: str, count: int = 8) -> str:
    """The functions with the most samples on top of the stack (self time), as percentages."""
    own: dict[str, int] = {}
    total = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, samples = line.rstrip().rpartition(" ")
                if not samples.isdigit():
                    continue
                leaf = stack.split(";")[-1]
                own[leaf] = own.get(leaf, 0) + int(samples)
                total += int(samples)
    except OSError as e:
        return f"no profile ({e.strerror})"
    top = sorted(own.items(), key=lambda item: -item[1])[:count]
    return "; ".join(f"{100 * n / total:.0f}% {name}" for name, n in top) if total else "no samples"


def medians(results: dict[str, list]) -> dict[str, tuple]:
    """Field-wise medians of each relay's per-round tuples (or plain numbers)."""
    out = {}
    for name, runs in results.items():
        if isinstance(runs[0], tuple):
            out[name] = tuple(statistics.median(run[i] for run in runs) for i in range(len(runs[0])))
        else:
            out[name] = (statistics.median(runs),)
    return out


def ratio(a: float | None, b: float | None) -> str:
    """a / b as ``1.23x``; ``n/a`` when either is missing, NaN or b is zero."""
    return f"{a / b:.2f}x" if a is not None and b and b == b and a == a else "n/a"


def table(title: str, columns: str, rows: dict[str, str], failed: dict[str, str]) -> list[str]:
    """A measurement's table: title, header, one row per measured relay, then the relays left out and why."""
    lines = [title, columns, "-" * len(columns)]
    lines += [f"{name:<18} {row}" for name, row in rows.items()]
    lines += [f"{name:<18} left out: {reason.splitlines()[0]}" for name, reason in failed.items()]
    return lines
