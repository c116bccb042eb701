"""``flatminima study``: the results study of :mod:`.study` from the command line.

Only argparse is imported here; the study (torch, numpy, scipy, matplotlib)
is imported when the command runs, so ``flatminima --help`` stays fast and
works without the ``cli`` extra.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "study", help="the results study: methods x data sets x noise levels x seeds, tuned radii, CIs",
        description="Sweep each method's radius on a validation split (one seed), then train SGD and every method "
                    "at its kept radius with several seeds on MNIST-1D (MLP and CNN) and digits (CNN), clean and "
                    "with label noise; write results.md (95% confidence intervals, paired differences to SGD, "
                    "passes, lambda_max and trace), sweep.md, summary.csv, study.json and plots. The full preset "
                    "takes about an hour on 2 quiet cores with --workers 2; see docs/study.md.")
    p.add_argument("--preset", default="full", choices=("full", "fast"),
                   help="full: the study of RESULTS.md; fast: tiny settings that run in seconds (default: full)")
    p.add_argument("--out", metavar="DIR", help="results folder (default: runs/study-<preset>-<timestamp>)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="runs trained at once, one process (and one core) each (default: 1)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out (finished runs are kept)")
    p.add_argument("--progress", choices=("auto", "rich", "plain", "none"), default="auto",
                   help="progress lines on stderr, one per finished run (default: auto)")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    p.set_defaults(func=cmd_study)
    return p


def cmd_study(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .progress import make_reporter
    from .study import ensure_study_available, main_message, run_study

    ensure_study_available()
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out, the study folder to continue")
    out = Path(args.out) if args.out else Path("runs") / f"study-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = ["flatminima", *(sys.argv[1:] if args._argv is None else args._argv)]
    reporter = make_reporter(args.progress)
    try:
        result = run_study(args.preset, out=out, workers=args.workers, resume=args.resume, reporter=reporter,
                           plots=not args.no_plots, command=argv)
    except KeyboardInterrupt:
        reporter.close()
        print(f"\nflatminima: interrupted; the finished runs are in {out}/runs.\n"
              f"Continue with: flatminima study --preset {args.preset} --out {out} --resume", file=sys.stderr)
        return 130
    finally:
        reporter.close()
    print(main_message(result))
    return 0
