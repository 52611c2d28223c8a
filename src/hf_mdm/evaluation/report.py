"""The outputs of `hf-mdm evaluate`: a Markdown table and a plot of generative perplexity against entropy.

Each result row is a dict with keys `kind` ("mdm", "ar" or "reference"), `label`, `num_samples`,
`nfe_per_sample`, `seconds`, `generative_perplexity`, `gen_ppl_excluded`, `token_entropy` and `mauve` (None
where it does not apply).
"""

from collections.abc import Callable, Sequence
from pathlib import Path


KIND_NAMES = {"mdm": "MDM", "ar": "AR", "reference": "reference"}


def _cell(value, digits: int, spread=None) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def markdown_table(rows: Sequence[dict], judge: str, footnotes: Sequence[str] = (),
                   extra_columns: Sequence[tuple[str, Callable[[dict], str]]] = ()) -> str:
    """A Markdown table, one line per row; footnotes (e.g. the NELBO) go below it.

    A row merged from runs with several seeds (it has `seeds`) shows seeds × samples per seed, and its gen PPL,
    entropy and MAUVE with their spread between seeds (`FIELD_spread`). `extra_columns` are (header, cell of a
    row) pairs added on the right."""
    merged = any("seeds" in row for row in rows)
    lines = [
        f"| model | setting | {'seeds × samples' if merged else 'samples'} | NFE / sample | time (s) "
        f"| gen PPL ({judge}) | entropy | MAUVE |" + "".join(f" {header} |" for header, _ in extra_columns),
        "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra_columns),
    ]
    for row in rows:
        samples = f"{len(row['seeds'])} × {row['num_samples'] // len(row['seeds'])}" if "seeds" in row \
            else row["num_samples"]
        lines.append(
            f"| {KIND_NAMES[row['kind']]} | {row['label']} | {samples} | {_cell(row['nfe_per_sample'], 1)} "
            f"| {_cell(row['seconds'], 1)} "
            f"| {_cell(row['generative_perplexity'], 2, row.get('generative_perplexity_spread'))} "
            f"| {_cell(row['token_entropy'], 3, row.get('token_entropy_spread'))} "
            f"| {_cell(row['mauve'], 3, row.get('mauve_spread'))} |"
            + "".join(f" {cell(row)} |" for _, cell in extra_columns)
        )
    excluded = [f"{row['label']}: {row['gen_ppl_excluded']}" for row in rows if row.get("gen_ppl_excluded")]
    notes = list(footnotes)
    if excluded:
        notes.append("Texts with fewer than two judge tokens, left out of gen PPL: " + ", ".join(excluded) + ".")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot_results(rows: Sequence[dict], path: str | Path, judge: str, title: str = "") -> None:
    """Generative perplexity (log scale) against token entropy: one labelled point per MDM setting, the AR
    baseline as a line over its temperatures, the reference texts' entropy as a vertical line. Writes a PNG."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # the Agg canvas, without touching pyplot's global backend

    figure = Figure(figsize=(9.0, 5.0), layout="constrained")
    axes = figure.subplots()
    mdm = [row for row in rows if row["kind"] == "mdm"]
    # Ten default colours, or twenty paler ones: no two settings share a colour up to twenty.
    palette = [f"C{i}" for i in range(10)] if len(mdm) <= 10 else [colormaps["tab20"](i) for i in range(20)]
    for index, row in enumerate(mdm, start=1):  # points carry a number, the legend says which setting it is
        marker = "o" if row["label"].startswith("FHS") else "s"
        axes.scatter(row["token_entropy"], row["generative_perplexity"], marker=marker, s=40, zorder=3,
                     color=palette[(index - 1) % len(palette)], label=f"[{index}] MDM {row['label']}")
        axes.annotate(str(index), (row["token_entropy"], row["generative_perplexity"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=7)
    ar = sorted((row for row in rows if row["kind"] == "ar"), key=lambda row: row["token_entropy"])
    if ar:
        axes.plot([r["token_entropy"] for r in ar], [r["generative_perplexity"] for r in ar], "k--^", markersize=5,
                  label="AR baseline (temperatures)", zorder=2)
        for row in ar:
            axes.annotate(row["label"], (row["token_entropy"], row["generative_perplexity"]),
                          textcoords="offset points", xytext=(5, -10), fontsize=7)
    for row in rows:
        if row["kind"] == "reference":
            axes.axvline(row["token_entropy"], color="grey", linestyle=":",
                         label=f"reference texts' entropy ({row['token_entropy']:.2f})")
    axes.set_yscale("log")
    axes.set_xlabel("token entropy (nats, higher = more diverse)")
    axes.set_ylabel(f"generative perplexity under {judge} (log scale)")
    axes.set_title(title or "Generative perplexity against entropy (left of the reference line: too repetitive)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.savefig(path, dpi=150)
