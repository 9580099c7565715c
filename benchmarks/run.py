"""Run the benchmarks, print their tables, append them to RESULTS.md and check the targets.

    python -m benchmarks.run --profile full    # make bench: everything (well under 30 minutes)
    python -m benchmarks.run --profile quick   # make bench-check: the targets, under 3 minutes

Exits with status 1 when a measured target is missed (each target is printed
with its measured value), 0 otherwise.  ``--profile full`` also rewrites the
"Performance" section of README.md with the latest tables (``--no-readme``
to skip).  The quick profile skips the peers (huey, procrastinate) and uses
smaller sizes; it says so in its output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from typing import Any

from . import bench_keys, bench_scans
from .common import README, RESULTS, Table, Target, environment, median, run_child, scratch_session, targets_table

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "keys": 20_000,
        "scans": {
            "promote_sizes": [100, 1_000, 10_000, 100_000],
            "claim_sizes": [0, 10_000],
            "claim_rounds": 400,  # a p99 of 100 samples is one outlier
            "compare_cursor": False,
            "dead_depth": 10_000,
            "reps": 9,
        },
        "throughput": {
            "stores": ["file"],
            "payloads": [64],
            "concurrency": [256],
            "jobs": {256: 4_000},
            "target_repeats": 5,
            "stock_ceiling": True,
        },
        "peers": False,
        "memory": {"n": 20_000},
    },
    "full": {
        "keys": 100_000,
        "scans": {
            "promote_sizes": [100, 1_000, 10_000, 100_000],
            "claim_sizes": [0, 10_000, 100_000],
            "claim_rounds": 1_000,  # a p99 of 300 sub-millisecond claims was 3 samples: one pause moved it 60%
            "compare_cursor": True,
            "dead_depth": 100_000,
            "reps": 9,
        },
        "throughput": {
            "stores": ["memory", "file"],
            "payloads": [64, 16_384],
            "concurrency": [1, 16, 256],
            "jobs": {1: 3_000, 16: 10_000, 256: 10_000},
            "target_repeats": 5,
            "peer_repeats": 3,
            "stock_ceiling": True,
        },
        "peers": True,
        "memory": {"n": 100_000},
    },
}

TARGET_STORE, TARGET_CONC, TARGET_PAYLOAD = "file", 256, 64
RSS_LIMIT_MB = 250


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def size_label(payload: int) -> str:
    return f"{payload // 1024} KiB" if payload >= 1024 else f"{payload} B"


# -- throughput, ceiling and peers -----------------------------------------------------------


def throughput(cfg: dict[str, Any], with_peers: bool) -> tuple[list[Table], list[Target], dict[str, Any]]:
    raw: dict[str, Any] = {"taquba": {}, "ceiling": {}, "stock": {}, "huey": {}, "beside_huey": {},
                           "procrastinate": {}, "asyncio": {}}

    def child(kind: str, store: str, payload: int, conc: int, n: int, **extra: Any) -> dict[str, Any]:
        env = {"TAQUBA_SLATEDB_FAST_FFI": "0"} if extra.pop("stock", False) else None
        args = {"kind": kind, "store": store, "payload": payload, "conc": conc, "n": n, **extra}
        return run_child("benchmarks.bench_throughput", args, env=env)

    for store in cfg["stores"]:
        for payload in cfg["payloads"]:
            for conc in cfg["concurrency"]:
                n = cfg["jobs"][conc]
                key = f"{store}/{payload}/{conc}"
                target = (store, conc, payload) == (TARGET_STORE, TARGET_CONC, TARGET_PAYLOAD)
                repeats = cfg["target_repeats"] if target else 1
                runs, ceilings = [], []
                for _ in range(repeats):  # taquba and the ceiling alternate, so that both see the same machine
                    runs.append(child("taquba", store, payload, conc, n))
                    ceilings.append(child("ceiling", store, payload, conc, n))
                best = raw["taquba"][key] = median_run(runs, "jobs_per_s")
                ceiling = raw["ceiling"][key] = median_run(ceilings, "commits_per_s")
                if cfg["stock_ceiling"]:
                    raw["stock"][key] = child("ceiling", store, payload, conc, n, stock=True)
                log(f"taquba {store}:// {size_label(payload)} x{conc}: {best['jobs_per_s']:.0f} jobs/s "
                    f"(runs {_runs(best)}); ceiling {ceiling['commits_per_s']:.0f} commits/s")
    peer_version = ""
    if with_peers:
        from . import postgres

        for payload in cfg["payloads"]:
            for conc in cfg["concurrency"]:
                n = cfg["jobs"][conc]
                key = f"file/{payload}/{conc}"
                ours, hueys = [], []
                for _ in range(cfg["peer_repeats"]):  # alternating, so that both see the same minutes
                    ours.append(child("taquba", "file", payload, conc, n))
                    hueys.append(child("huey", "file", payload, conc, n))
                raw["beside_huey"][key] = median_run(ours, "jobs_per_s")
                raw["huey"][key] = median_run(hueys, "jobs_per_s")
                raw["asyncio"][key] = child("taquba", "file", payload, conc, n, loop="asyncio")
                log(f"huey {size_label(payload)} x{conc}: {raw['huey'][key]['jobs_per_s']:.0f} jobs/s "
                    f"(runs {_runs(raw['huey'][key])}), taquba beside it {raw['beside_huey'][key]['jobs_per_s']:.0f} "
                    f"(runs {_runs(raw['beside_huey'][key])}); taquba on asyncio's loop "
                    f"{raw['asyncio'][key]['jobs_per_s']:.0f} jobs/s")
        with postgres.server(log) as (conninfo, peer_version):
            for i, payload in enumerate(cfg["payloads"]):
                for conc in cfg["concurrency"]:
                    n = cfg["jobs"][conc]
                    key = f"file/{payload}/{conc}"
                    db = postgres.create_database(conninfo, f"bench_{i}_{conc}")
                    raw["procrastinate"][key] = child("procrastinate", "file", payload, conc, n, conninfo=db)
                    log(f"procrastinate {size_label(payload)} x{conc}: {raw['procrastinate'][key]['jobs_per_s']:.0f} jobs/s")
    raw["postgresql"] = peer_version
    return _throughput_tables(cfg, raw, with_peers)


def median_run(runs: list[dict[str, Any]], field: str) -> dict[str, Any]:
    """The run with the median ``field`` (the upper one of an even count), with every run's value under "repeats"."""
    middle = dict(sorted(runs, key=lambda r: r[field])[len(runs) // 2])
    middle["repeats"] = [r[field] for r in runs]
    return middle


def _runs(run: dict[str, Any]) -> str:
    return ", ".join(f"{v:.0f}" for v in run["repeats"])


def _throughput_tables(cfg: dict[str, Any], raw: dict[str, Any], with_peers: bool) -> tuple[list[Table], list[Target], dict[str, Any]]:
    tables = []
    t = Table(
        "End to end: enqueue → claim → ack, every returned enqueue and ack durable (latencies in ms)",
        ["store", "payload", "conc", "jobs", "jobs/s", "enq p50", "enq p99", "claim p50", "claim p99",
         "ack p50", "ack p99", "e2e p50", "e2e p99", "CPU µs/job"],
    )
    for key, r in raw["taquba"].items():
        store, payload, conc = key.split("/")
        t.add(f"{store}://", size_label(int(payload)), int(conc), cfg["jobs"][int(conc)], r["jobs_per_s"],
              r["enqueue_p50_ms"], r["enqueue_p99_ms"], r["claim_p50_ms"], r["claim_p99_ms"],
              r["ack_p50_ms"], r["ack_p99_ms"], r["e2e_p50_ms"], r["e2e_p99_ms"], r["cpu_us_per_job"])
    t.notes.append("conc producers enqueue one job per call while run_worker_concurrent(concurrency=conc) claims "
                   "(in batches sized to its free slots) and acks with a no-op handler, in one process")
    t.notes.append("e2e = enqueue call to durable ack; the producers enqueue as fast as they can, so at high "
                   "concurrency it is mostly time spent in the backlog")
    if cfg["target_repeats"] > 1:
        t.notes.append(f"the {TARGET_STORE}:// {TARGET_PAYLOAD} B x{TARGET_CONC} row is the median of "
                       f"{cfg['target_repeats']} runs alternating with the ceiling")
    tables.append(t)

    c = Table(
        "Engine ceiling: raw slatedb.uniffi durable transactions of the enqueue's shape (put record, put index, merge counter)",
        ["store", "payload", "conc", "commits/s", "commit p50 ms", "taquba jobs/s", "jobs/s ÷ (ceiling÷3)",
         "stock-binding commits/s", "÷ (stock÷3)"],
    )
    for key, r in raw["ceiling"].items():
        store, payload, conc = key.split("/")
        jobs = raw["taquba"][key]["jobs_per_s"]
        stock = raw["stock"].get(key)
        c.add(f"{store}://", size_label(int(payload)), int(conc), r["commits_per_s"], r["commit_p50_ms"], jobs,
              jobs / (r["commits_per_s"] / 3), stock["commits_per_s"] if stock else None,
              jobs / (stock["commits_per_s"] / 3) if stock else None)
    c.notes.append("commits/s uses the same FFI fast path as taquba (taquba_backends/_uniffi_fast.py); "
                   "'stock binding' is slatedb.uniffi as shipped (TAQUBA_SLATEDB_FAST_FFI=0)")
    c.notes.append("a job is three transitions (enqueue, claim, ack; the claim does not wait for durability): ceiling ÷ 3 is the job rate of "
                   "one engine transaction per transition")
    tables.append(c)

    targets = []
    tkey = f"{TARGET_STORE}/{TARGET_PAYLOAD}/{TARGET_CONC}"
    if tkey in raw["ceiling"]:
        jobs = raw["taquba"][tkey]["jobs_per_s"]
        ceiling = raw["ceiling"][tkey]["commits_per_s"]
        stock = raw["stock"].get(tkey, {}).get("commits_per_s")
        detail = f"{jobs:.0f} jobs/s vs ceiling {ceiling:.0f} commits/s (fast path)"
        if stock:
            detail += f"; vs the stock binding ({stock:.0f}/s): {jobs / (stock / 3):.2f}"
        targets.append(Target.at_least(f"6. jobs/s ÷ (ceiling ÷ 3), {TARGET_STORE}:// x{TARGET_CONC}",
                                       jobs / (ceiling / 3), 0.8, detail))

    if with_peers:
        p = Table(
            "Peers, same job count, payload and concurrency, all durable: taquba file:// vs huey (SQLite, fsync) "
            "and procrastinate (PostgreSQL); latencies in ms",
            ["payload", "conc", "taquba jobs/s", "taquba beside huey", "huey jobs/s", "taquba/huey", "procrastinate jobs/s",
             "taquba/procr.", "taquba on asyncio's loop", "÷ huey", "huey enq p50/p99", "huey e2e p50/p99",
             "procr. enq p50/p99", "procr. e2e p50/p99"],
        )
        ratios: dict[str, list[tuple[float, str]]] = {"huey": [], "procrastinate": []}
        for key, h in raw["huey"].items():
            _, payload, conc = key.split("/")
            pr = raw["procrastinate"][key]
            jobs = raw["taquba"][key]["jobs_per_s"]
            beside = raw["beside_huey"][key]["jobs_per_s"]
            label = f"{size_label(int(payload))} x{conc}"
            ratios["huey"].append((beside / h["jobs_per_s"], label))
            ratios["procrastinate"].append((jobs / pr["jobs_per_s"], label))
            plain = raw["asyncio"][key]["jobs_per_s"]
            p.add(size_label(int(payload)), int(conc), jobs, beside, h["jobs_per_s"], beside / h["jobs_per_s"],
                  pr["jobs_per_s"], jobs / pr["jobs_per_s"], plain, plain / h["jobs_per_s"],
                  f"{h['enqueue_p50_ms']:.2f}/{h['enqueue_p99_ms']:.2f}", f"{h['e2e_p50_ms']:.0f}/{h['e2e_p99_ms']:.0f}",
                  f"{pr['enqueue_p50_ms']:.2f}/{pr['enqueue_p99_ms']:.2f}", f"{pr['e2e_p50_ms']:.0f}/{pr['e2e_p99_ms']:.0f}")
        p.notes.append(f"taquba/huey: medians of {cfg['peer_repeats']} runs of each, taquba and huey alternating "
                       "(this machine's speed drifts by ±15% between minutes); 'taquba jobs/s' is the end-to-end "
                       "table's run, against which procrastinate is compared")
        p.notes.append("huey: SqliteHuey(fsync=True) (synchronous=FULL, WAL), results stored, thread consumer with "
                       "conc workers polling every 5-50 ms; done = SIGNAL_COMPLETE")
        p.notes.append(f"procrastinate on {raw.get('postgresql') or 'PostgreSQL'} at 127.0.0.1 (fsync=on, "
                       "synchronous_commit=on), worker concurrency conc, LISTEN/NOTIFY; done = finish_job returned")
        p.notes.append("the peers expose no separate claim/ack latency; taquba's file:// WAL writes are not fsynced "
                       "by SlateDB's local object store, huey's and PostgreSQL's commits are")
        loops = sorted({r.get("event_loop", "?") for r in raw["taquba"].values()})
        p.notes.append("taquba, its ceiling and procrastinate run through taquba_backends.run, on uvloop when installed "
                       f"(here: {', '.join(loops)}), "
                       "as the README's Quick start and the command line do; 'taquba on asyncio's loop' is the same "
                       "run under asyncio.run, for comparison")
        tables.append(p)
        for peer, values in ratios.items():
            worst, where = min(values)
            detail = "; ".join(f"{label}: {v:.2f}" for v, label in values)
            targets.append(Target.above(f"7. taquba/{peer} end-to-end jobs/s (min over configs, worst {where})",
                                        worst, 1.0, detail))
    return tables, targets, raw


# -- memory --------------------------------------------------------------------------------


def memory(cfg: dict[str, Any]) -> tuple[list[Table], list[Target], dict[str, Any]]:
    r = run_child("benchmarks.bench_memory", {"n": cfg["n"]}, timeout=1800)
    t = Table(f"Memory: {cfg['n']:,} jobs enqueued in batches of 1,000, then drained by 16 workers (file://)",
              ["phase", "RSS MB"])
    t.add("interpreter + imports", r["baseline_mb"])
    t.add("store open", r["opened_mb"])
    t.add("peak while enqueueing", r["peak_enqueue_mb"])
    t.add("peak while draining", r["peak_drain_mb"])
    t.add("peak (VmHWM)", r["peak_rss_mb"])
    t.notes.append(f"enqueue {r['enqueue_s']:.1f} s, drain {r['drain_s']:.1f} s ({r['drain_jobs_per_s']:.0f} jobs/s)")
    target = Target.below(f"8. peak RSS, {cfg['n']:,} jobs enqueued and drained (MB)", r["peak_rss_mb"], RSS_LIMIT_MB)
    return [t], [target], r


# -- results ---------------------------------------------------------------------------------


def results_entry(profile: str, env: dict[str, Any], params: dict[str, Any], command: str,
                  tables: list[Table], targets: list[Target], elapsed: float, skipped: list[str]) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v != "not installed")
    lines = [
        f"## {env['date']} — profile `{profile}` — commit {env['commit']}",
        "",
        f"- command: `{command}`",
        f"- machine: {env['cores']} cores, {env['ram_gib']} GiB RAM, {env['cpu']}; {env['os']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in env['load_average'] or [])}",
        f"- Python {env['python']}; {pkgs}" + (f"; {env['postgresql']}" if env.get("postgresql") else ""),
        f"- slatedb FFI fast path: {'on' if env['fast_ffi'] else 'off'}; SlateDB flush interval 5 ms (local default)",
        f"- parameters: `{json.dumps(params, sort_keys=True)}`",
        f"- run time: {elapsed / 60:.1f} min",
    ]
    lines += [f"- skipped in this profile: {s}" for s in skipped]
    lines.append("")
    for table in [*tables, targets_table(targets)]:
        lines += [table.markdown(), ""]
    return "\n".join(lines) + "\n"


def append_results(entry: str) -> None:
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\n"
            "Append-only: each run of `make bench` or `make bench-check` adds an entry at the end "
            "(see benchmarks/README.md for what each benchmark measures).\n\n"
        )
    with RESULTS.open("a") as f:
        f.write(entry + "\n")


README_BEGIN = "<!-- performance:begin (written by `make bench`) -->"
README_END = "<!-- performance:end -->"
README_TABLES = ("**Targets", "**End to end", "**Engine ceiling", "**Peers", "**Memory")
"""The tables of a full run the README quotes (the others are in RESULTS.md)."""


def update_readme_from_results() -> bool:
    """Quote the latest full entry of RESULTS.md in README.md's Performance section."""
    text = README.read_text()
    if README_BEGIN not in text or README_END not in text or not RESULTS.exists():
        return False
    entries = re.split(r"(?m)^(?=## )", RESULTS.read_text())
    full = [e for e in entries if e.startswith("## ") and "profile `full`" in e.splitlines()[0]]
    if not full:
        return False
    entry = full[-1]
    head = entry.splitlines()[0][3:]
    date, _, rest = head.partition(" — profile `full` — ")
    machine = next((line[len("- machine: "):] for line in entry.splitlines() if line.startswith("- machine: ")), "")
    command = next((line[len("- command: "):] for line in entry.splitlines() if line.startswith("- command: ")), "")
    blocks = [b.strip() for b in re.split(r"\n\s*\n(?=\*\*)", entry) if b.strip().startswith(README_TABLES)]
    blocks.sort(key=lambda b: next(i for i, t in enumerate(README_TABLES) if b.startswith(t)))
    body = [README_BEGIN, "",
            f"Latest full run ({command}): {date}, {rest}; {machine}.  Every entry, with the "
            "key-ordering tables, is in [benchmarks/RESULTS.md](benchmarks/RESULTS.md).", ""]
    for block in blocks:
        body += [block, ""]
    body.append(README_END)
    pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    README.write_text(pattern.sub(lambda _: "\n".join(body), text))
    return True


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--only", default="keys,scans,throughput,memory",
                        help="comma-separated subset of keys,scans,throughput,memory")
    parser.add_argument("--no-peers", action="store_true", help="skip huey and procrastinate")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's Performance section")
    parser.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--readme-only", action="store_true",
                        help="only rewrite README.md's Performance section from the latest full entry of RESULTS.md")
    args = parser.parse_args(argv)
    if args.readme_only:
        return 0 if update_readme_from_results() else 1
    profile = PROFILES[args.profile]
    only = set(args.only.split(","))
    with_peers = profile["peers"] and not args.no_peers and "throughput" in only
    command = os.environ.get("BENCH_COMMAND") or "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    skipped = []
    if args.profile == "quick":
        skipped.append("peers (huey, procrastinate): run `make bench` for them")
        skipped.append("smaller sizes: claims after M up to 10k (not 100k), dead page after 10k (not 100k), "
                       "memory with 20k jobs (not 100k), keys 20k per space (not 100k); throughput only "
                       "file:// 64 B x256 (the ceiling target)")
    elif not with_peers:
        skipped.append("peers (huey, procrastinate)")
    for note in skipped:
        log(f"note: skipped — {note}")

    env = environment()
    start = time.time()
    with scratch_session():
        tables, targets = measure(profile, only, with_peers, env)
    elapsed = time.time() - start
    return report(args, profile, only, with_peers, env, command, tables, targets, elapsed, skipped)


def measure(profile: dict, only: set[str], with_peers: bool, env: dict[str, Any]) -> tuple[list[Table], list[Target]]:
    """Run the benchmarks ``only`` names; ``env`` gets the PostgreSQL version when peers ran."""
    tables: list[Table] = []
    targets: list[Target] = []
    if "keys" in only:
        log("key spaces: encode/parse and sort order...")
        t, g = bench_keys.run(profile["keys"])
        t[0].print()
        tables += t
        targets += g
    if "scans" in only:
        log("sweeps and claims against store size (file://)...")
        t, g = bench_scans.run(profile["scans"])
        tables += t
        targets += g
    if "throughput" in only:
        log("throughput, engine ceiling" + (" and peers" if with_peers else "") + " (one child process per run)...")
        t, g, raw = throughput(profile["throughput"], with_peers)
        env["postgresql"] = raw.get("postgresql", "")
        for table in t:
            table.print()
        tables += t
        targets += g
    if "memory" in only:
        log("memory (child process)...")
        t, g, _ = memory(profile["memory"])
        t[0].print()
        tables += t
        targets += g
    return tables, targets


def report(args: argparse.Namespace, profile: dict, only: set[str], with_peers: bool, env: dict[str, Any], command: str,
           tables: list[Table], targets: list[Target], elapsed: float, skipped: list[str]) -> int:
    """Print the targets, append to RESULTS.md, update the README; 1 when a target is missed."""
    summary = targets_table(targets)
    summary.print()
    params = {k: v for k, v in profile.items() if k in {"keys", "scans", "throughput", "memory"} or k == "peers"}
    params["peers"] = with_peers
    params["only"] = sorted(only)
    if not args.no_results:
        append_results(results_entry(args.profile, env, params, command, tables, targets, elapsed, skipped))
        log(f"appended to {RESULTS.relative_to(RESULTS.parent.parent)}")
    if args.profile == "full" and not args.no_readme and not args.no_results and only == {"keys", "scans", "throughput", "memory"}:
        if update_readme_from_results():
            log("README.md Performance section updated")
    missed = [t for t in targets if t.ok is False]
    log(f"{len(targets) - len(missed)} of {len(targets)} targets met in {elapsed / 60:.1f} min")
    for t in missed:
        print(f"MISSED: {t.name}: goal {t.goal}, measured {t.measured:.3g} ({t.detail})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
