"""The paper's Table 2 from finished runs:
`python report.py DIR [DIR ...] [--out FOLDER] [--wandb]`.

DIR: a run folder (with results.json), a sweep job folder (with run_dir.txt), or any folder
holding them, e.g. the sweep of `python train.py -m method=irnet,seam conta=off,on seed=0,1,2`
(outputs/multirun/<name>). Prints the table and writes table2.md and table2.png to FOLDER
(default: the first DIR); --wandb also logs it to W&B (offline unless logged in).

Exit status: 0 written; 2 bad input (no runs, a malformed or duplicate results.json, a run
missing a metric; the one-line message names the file and the fix). Details in
src/evaluation/table2.py.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="run, sweep job or sweep folders")
    parser.add_argument("--out", type=Path, help="folder for table2.md and table2.png")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B")
    args = parser.parse_args(argv)

    from src.evaluation.table2 import Table2Error, write_report

    try:
        text, files = write_report(args.dirs, args.out or args.dirs[0], wandb=args.wandb)
    except (Table2Error, OSError) as err:  # OSError: the out folder (DiskWriteError too)
        print(f"report.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(text)
    print("written: " + ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()
