"""`amorlip compare`: train several objectives with the same model, data, batch, seeds and steps, evaluate
each, and write a markdown/CSV table and PNG plots (the small-scale counterpart of the paper's Table 1 and
Figure 3).

Entries are objective names, or preset names (their own settings, e.g. `tiny-fastclip`), with optional
overrides in brackets, so ablations run the same way:

    amorlip compare --config tiny-clip --objectives 'clip,clip[temperature.scheme=rescaled],amorlip[amor.divide_by=target]'
    amorlip compare --objectives 'tiny-clip,tiny-fastclip,tiny-amorlip' --train.steps 600

Command-line overrides apply to every entry; an entry's own overrides come next, then the sweep point's.
`--sweep KEY=V1,V2` (repeatable: several make a grid) runs every entry at every point; `--budget` says what a
batch-size sweep holds equal (samples seen, by default). Each (entry, sweep point, seed) is one run, named
`{entry}-s{seed}-{hash of its result-changing settings}`, so a run already finished with the same settings is
skipped and a half-finished one resumes from its checkpoint. `--jobs N` trains N runs at once, each in its own
process (amorlip.jobs). Tables show the mean and the 95% t interval over seeds, and with `--reference LABEL`
each entry's paired difference to that entry with a verdict (amorlip.stats).

One layer per module, each importing only those before it: `entries` (the words of --objectives, --seeds,
--jobs), `plan` (sweeps, budgets, the validated and named runs), `results` (finished runs and their records),
`tables`, `plots`, `outputs` (everything written, rebuilt from results.json) and `run` (the command itself).
"""
from amorlip.compare.entries import Entry, parse_entry, safe_name, split_entries
from amorlip.compare.outputs import rebuild_outputs, write_outputs
from amorlip.compare.plan import (Plan, PlannedRun, compare_configs, compare_plan, parse_sweeps, point_label,
                                  sweep_points)
from amorlip.compare.plots import normalizer_curves
from amorlip.compare.results import finished_metrics
from amorlip.compare.run import run_compare
from amorlip.compare.tables import build_differences, build_table

__all__ = ["Entry", "Plan", "PlannedRun", "build_differences", "build_table", "compare_configs", "compare_plan",
           "finished_metrics", "normalizer_curves", "parse_entry", "parse_sweeps", "point_label", "rebuild_outputs",
           "run_compare", "safe_name", "split_entries", "sweep_points", "write_outputs"]
