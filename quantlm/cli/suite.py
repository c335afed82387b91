"""`quantlm suite`: regenerate a suite (train, quantize, size, evaluate, tabulate, plot), resumable."""

from __future__ import annotations

import sys

from quantlm import suite
from quantlm.paths import recipes_dir


def register(sub) -> None:
    p = sub.add_parser(
        "suite", help="regenerate a suite: every FloatLM x bitwidth x seed, evaluated, sized and plotted",
        description="Plan and run a suite manifest (a YAML path, or a shipped one: suite-tiny, suite-spectra). Jobs whose outputs exist with the "
                    "same recipe hash are skipped, so an interrupted run resumes where it stopped. With no "
                    "MANIFEST: the embedded tiny suite (suite-tiny), written to results/suite-tiny/ in the working directory.")
    p.add_argument("manifest", nargs="?", help="suite manifest YAML or shipped name (default: suite-tiny)")
    p.add_argument("--only", nargs="+", metavar="JOB", help="run only these job ids or glob patterns")
    p.add_argument("--dry-run", action="store_true", help="print the plan with sizes and disk usage; run nothing")
    p.add_argument("--list-jobs", action="store_true", help="print one job id per line (for a scheduler)")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plots from the records")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:

    path = args.manifest or str(recipes_dir() / "suite-tiny.yaml")
    manifest, base = suite.load_manifest(path)
    if args.list_jobs:
        for job in suite.select(suite.plan(manifest, base), args.only):
            print(job.id)
        return 0
    if args.dry_run:
        _print_plan(suite.describe_plan(manifest, base), args.only, manifest)
        return 0
    failed = False
    if not args.report:
        summary = suite.run(manifest, base, only=args.only, progress=args.progress)
        failed = bool(summary.failed or summary.blocked or summary.elsewhere)  # asked-for work not done here
        print(f"suite {manifest.name}: {len(summary.done)} jobs done, {len(summary.skipped)} already done, "
              f"{len(summary.failed)} failed, {len(summary.blocked)} blocked"
              + (f", {len(summary.elsewhere)} running in another process" if summary.elsewhere else "")
              + (f", {len(summary.not_run)} not run here" if summary.not_run else ""))
        for job_id, why in summary.rerun.items():
            print(f"  {job_id}: ran again, {why}", file=sys.stderr)
        for job_id, err in {**summary.failed, **summary.blocked}.items():
            print(f"  {job_id}: {err}", file=sys.stderr)
        for job_id, holder in summary.elsewhere.items():
            print(f"  {job_id}: left to another process ({holder})", file=sys.stderr)
        for reason in dict.fromkeys(summary.not_run.values()):  # one line per reason (deploy: no llama_cpp)
            ids = [j for j, r in summary.not_run.items() if r == reason]
            print(f"  not run ({len(ids)} jobs, e.g. {ids[0]}): {reason}", file=sys.stderr)
        if args.only:  # one job of a scheduler's array: the report is built once all have run
            return 1 if failed else 0
    out = suite.report(manifest, base)
    print(out["table"].to_string(index=False))
    print(f"\ntable: {out['csv']}\n       {out['markdown']}")
    for p in out["plots"]:
        print(f"plot:  {p}")
    return 1 if failed else 0


def _print_plan(rows, only, manifest) -> None:
    import fnmatch

    import pandas as pd

    df = pd.DataFrame(rows)
    if only:
        df = df[df["job"].map(lambda j: any(fnmatch.fnmatch(j, p) or j == p for p in only))]
    show = df.copy()
    for c in ("paper_GB", "exact_GB", "disk_GB", "peak_mem_GB"):
        if c in show:
            show[c] = show[c].map(lambda v: "" if v != v or v is None else f"{v:.3f}")
    if "bits" in show:
        show["bits"] = show["bits"].astype("Int64")
    if "seed" in show:
        show["seed"] = show["seed"].astype("Int64")
    print(show.to_string(index=False))
    counts = df["kind"].value_counts().to_dict()
    disk = df.loc[~df["done"], "disk_GB"].fillna(0).sum() if "disk_GB" in df else 0.0  # only jobs still to run
    print(f"\nsuite {manifest.name}: {len(df)} jobs ({', '.join(f'{v} {k}' for k, v in counts.items())}), "
          f"{int(df['done'].sum())} already done; expected new disk usage {disk:.2f} GB "
          "(unpacked QuantLM checkpoints and trained models)")
