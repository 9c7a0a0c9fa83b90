"""``cytopipe simulate``: write a simulated IL-2 trial with ground truth."""

from __future__ import annotations

import argparse
import time

from cytopipe.config import seed_argument
from cytopipe.simulate.cohort import SimulationError


def _visits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"visits must be comma-separated weeks, e.g. 0,4,12,24; got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument(
        "--patients", type=int, default=8, help="number of patients (default 8; arms 1:1:1:1)"
    )
    parser.add_argument(
        "--visits",
        type=_visits,
        default="0,4,12,24",  # a string: argparse parses it with _visits; = params.DEFAULT_VISITS (tested)
        help="visit weeks, comma-separated (default 0,4,12,24)",
    )
    parser.add_argument(
        "--events", type=int, default=20000, help="mean events per sample file, +-30%% (default 20000)"
    )
    parser.add_argument(
        "--seed", type=seed_argument, default=0, help="random seed (>= 0); same seed -> byte-identical output"
    )
    parser.add_argument(
        "--effect", type=float, default=1.0, help="scale of every IL-2 effect: 1 = realistic, 0 = null trial"
    )
    parser.add_argument(
        "--faults",
        nargs="?",
        type=float,
        const=0.25,
        default=None,
        metavar="FRACTION",
        help="inject acquisition faults (clog, shift, margin pile-up; spike too with --instrument) into this "
        "fraction of files (default 0.25)",
    )
    parser.add_argument(
        "--control-events", type=int, default=5000, help="events per compensation control file"
    )
    parser.add_argument(
        "--instrument",
        default=None,
        metavar="NAME",
        help="measure on an instrument profile: fortessa, symphony, aurora, attune, cytof (mass cytometry), "
        "random (a fluorescence profile drawn per site from --seed) or random-mass; default: the original "
        "simulator instrument",
    )
    parser.add_argument(
        "--instrument-per",
        choices=("site", "batch"),
        default="site",
        help="with --instrument random: draw one profile per site (default) or per acquisition batch",
    )
    parser.add_argument(
        "--fmo",
        nargs="?",
        const="batch",
        default=None,
        choices=("batch", "site"),
        help="with --instrument: add FMO controls (manifest control fmo:<marker>), one per dim marker and "
        "batch (--fmo or --fmo batch) or one set per site, in its first batch (--fmo site)",
    )
    parser.add_argument(
        "--fmo-events",
        type=int,
        default=None,
        help="events per FMO control file (default 4 x --events, at least 50,000)",
    )
    parser.add_argument(
        "--fmo-markers",
        default=None,
        metavar="M1,M2",
        help="FMO controls of these dim markers only (default: every dim marker: CD25, CD127, CXCR3, CCR6, "
        "CXCR5, PD-1, CD56)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a trial already in --out")


def run(args: argparse.Namespace) -> int:
    from cytopipe.simulate.trial import simulate_trial

    if args.patients < 1:
        raise SimulationError(f"--patients must be at least 1, got {args.patients}")
    # options that only act with another one: refused rather than silently ignored
    for given, needs in (
        (args.fmo_events is not None and "--fmo-events", args.fmo and "--fmo"),
        (args.fmo_markers is not None and "--fmo-markers", args.fmo and "--fmo"),
        (args.instrument_per != "site" and "--instrument-per", args.instrument and "--instrument"),
    ):
        if given and not needs:
            wanted = "--instrument random" if given == "--instrument-per" else "--fmo"
            raise SimulationError(f"{given} is used only with {wanted}; add {wanted} or leave {given} out")
    t0 = time.perf_counter()
    trial = simulate_trial(
        args.out,
        n_patients=args.patients,
        visits=args.visits,
        events=args.events,
        seed=args.seed,
        effect=args.effect,
        faults=args.faults,
        control_events=args.control_events,
        overwrite=args.overwrite,
        instrument=args.instrument,
        fmo=args.fmo or False,
        fmo_events=args.fmo_events,
        fmo_markers=[m.strip() for m in args.fmo_markers.split(",")] if args.fmo_markers else None,
        instrument_per=args.instrument_per,
    )
    m = trial.manifest
    n_samples = int((m["control"] == "").sum())
    n_fmo = int(m["control"].str.startswith("fmo:").sum())
    fmo_text = f" (of which {n_fmo} FMO controls)" if n_fmo else ""
    print(
        f"wrote {n_samples} sample files and {len(m) - n_samples} controls{fmo_text} to {trial.out_dir} "
        f"({args.patients} patients, visits {','.join(map(str, trial.cohort.visits))}, seed {args.seed}, "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    if trial.faulted:
        print(
            f"faults injected into {len(trial.faulted)} files: see {trial.out_dir / 'truth' / 'faults.csv'}"
        )
    for unit, inst in trial.instruments.items():
        print(
            f"{args.instrument_per} {unit}: {inst.name} ({inst.cytometer}, {inst.kind}, $PnR {inst.pnr:.0f})"
        )
    print(f"manifest: {trial.out_dir / 'manifest.csv'}   truth: {trial.out_dir / 'truth'}")
    return 0
