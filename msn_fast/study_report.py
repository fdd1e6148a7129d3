"""The label-efficiency study's report (msn_fast.study): each dataset's margin of MSN over the better baseline, the
verdict against the bar, the Markdown table and the plot of 5-shot accuracy against pre-training minutes. Pure
functions of the report dict that msn_fast.study assembles and writes to report.json.
"""

from __future__ import annotations

from pathlib import Path

BARS = {"cifar10": ((1, 2, 5), 10.0), "caltech101": ((5,), 5.0)}
"""The bar the study is held to (README): MSN beats both baselines by this many points at these shots, top-1
and per-class mean."""


def margins(reports: list[dict]) -> dict[str, dict[str, float]]:
    """Points by which the first feature set beats the best of the others, per result, top-1 and per-class."""
    msn, others = reports[0]["results"], [r["results"] for r in reports[1:]]
    out = {}
    for name, r in msn.items():
        if all(name in o for o in others):
            out[name] = {k: round(100 * (r[k] - max(o[name][k] for o in others)), 2) for k in ("mean", "class_mean")}
    return out


def bar_verdict(name: str, gaps: dict[str, dict[str, float]]) -> dict | None:
    """The bar of a dataset in BARS: every listed shot's margin (top-1 and per-class mean) >= its points."""
    if name not in BARS:
        return None
    shots, points = BARS[name]
    rows = {f"{s}-shot": gaps.get(f"{s}-shot") for s in shots}
    met = all(g is not None and g["mean"] >= points and g["class_mean"] >= points for g in rows.values())
    return {"points": points, "shots": list(shots), "margins": rows, "met": met}


def _cell(r: dict | None) -> str:
    if r is None:
        return "–"
    return f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f} ({100 * r['class_mean']:.1f})"


def columns(report: dict) -> list[str]:
    """The results of every dataset's reports, in their order (k-shot, % labels, k-NN)."""
    cols: dict[str, None] = {}
    for ds in report["datasets"].values():
        for rep in ds["reports"]:
            cols.update(dict.fromkeys(rep["results"]))

    def kind(name: str) -> tuple[int, float]:
        number = name.split("-")[0].split("%")[0]
        order = 0 if name.endswith("-shot") else 1 if "% labels" in name else 2
        return order, float(number) if number.replace(".", "", 1).isdigit() else 0.0

    return sorted(cols, key=kind)


def markdown(report: dict) -> str:
    cols = columns(report)
    lines = [f"Measured {report['date']} on {report['machine']} ({report['cores']} cores) with `{report['command']}`: "
             f"recipe `{report['model']}`, {report['minutes']:g} min of pre-training wall clock per dataset, "
             f"{report['jobs']} run(s) at once. Top-1 % on the test split, mean ± std over {report['draws']} draws, "
             "per-class mean in brackets.", "",
             "| data | features | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for ds in report["datasets"].values():
        for rep in ds["reports"]:
            lines.append(f"| {ds['label']} | {rep['features']} | "
                         + " | ".join(_cell(rep["results"].get(c)) for c in cols) + " |")
        gaps = ds["margins"]
        lines.append(f"| {ds['label']} | *MSN − best baseline (points)* | " + " | ".join(
            f"{gaps[c]['mean']:+.1f} ({gaps[c]['class_mean']:+.1f})" if c in gaps else "–" for c in cols) + " |")
    lines.append("")
    for ds in report["datasets"].values():
        p = ds["pretrain"]
        lines.append(f"- {ds['label']}: {p['steps']} steps of {p['batch_size']} images ({p['epochs']:.1f} epochs of "
                     f"{p['train_images']} images) in {p['train_minutes'] or float('nan'):.1f} min; evaluation "
                     f"{ds['eval_seconds']:.0f} s. 5-shot curve (minutes: %): " + ", ".join(
                         f"{c['minutes'] if c['minutes'] is None else round(c['minutes'], 1)}: {100 * c['mean']:.1f}"
                         for c in ds["curve"]))
        bar = ds["bar"]
        if bar is not None:
            lines.append(f"  Bar (+{bar['points']:g} points over both baselines at "
                         f"{', '.join(f'{s}-shot' for s in bar['shots'])}): **{'met' if bar['met'] else 'not met'}**.")
    return "\n".join(lines) + "\n"


def plot_curve(report: dict, png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for i, ds in enumerate(report["datasets"].values()):
        c = [p for p in ds["curve"] if p["minutes"] is not None]
        ax.errorbar([p["minutes"] for p in c], [100 * p["mean"] for p in c], yerr=[100 * p["std"] for p in c],
                    color=f"C{i}", marker="o", capsize=3, label=f"{ds['label']} (MSN; minute 0 = random weights)")
        pix = ds["reports"][-1]["results"]["5-shot"]["mean"]
        ax.axhline(100 * pix, color=f"C{i}", linestyle=":", label=f"{ds['label']} raw pixels")
    ax.set(xlabel="pre-training wall clock (minutes)", ylabel="5-shot top-1 accuracy (%)",
           title="5-shot accuracy during pre-training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
