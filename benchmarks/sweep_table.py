"""Mean per (case, SNR, variant) of fit_sweep.py's JSON lines: python benchmarks/sweep_table.py F..."""
import json
import statistics
import sys
from collections import defaultdict

KEYS = ("T1 pure", "T2 pure", "T1 all", "T2 all", "T1 p99", "T2 p99", "PD pure")
rows = defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        d = json.loads(line)
        rows[(d["case"], d["snr"], d["variant"])].append(d)
print("| case | SNR | variant | n | " + " | ".join(KEYS) + " | s |")
print("|" + "---|" * (len(KEYS) + 5))
for (case, snr, name), ds in sorted(rows.items()):
    cells = [f"{statistics.mean(d[k] for d in ds if k in d):.3f}" if any(k in d for d in ds) else "-"
             for k in KEYS]
    print(f"| {case} | {snr:g} | {name} | {len(ds)} | " + " | ".join(cells)
          + f" | {statistics.mean(d['wall'] for d in ds):.0f} |")
