"""results.json, the paper-style results.md table and the plots, from the cell rows."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..outputs import write_json_atomic, write_text_atomic
from .spec import BenchSpec

ROW_KEYS = ("model", "task", "attack", "defense", "method", "seed", "asr", "false_trigger_rate", "clean_perplexity", "seconds",
            "eval_seconds", "format", "by_format", "defense_settings", "n_defense", "n_triggered", "n_clean", "victim_key", "device")


def is_conditional(victim_row: dict | None, spec: BenchSpec) -> bool | None:
    if victim_row is None:
        return None
    return (victim_row["asr"] >= spec.conditional.min_asr
            and victim_row["false_trigger_rate"] <= spec.conditional.max_false_trigger_rate)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_report(rows: list[dict], spec: BenchSpec, out: Path, command: str = "") -> dict:
    out = Path(out)
    victims = {(r["model"], r["task"], r["attack"], r["seed"]): r for r in rows if r["defense"] == "none"}
    results = []
    for r in rows:
        row = {k: r.get(k) for k in ROW_KEYS}
        if row["n_defense"] is None:  # cells made before per-defense n_clean existed used the spec's n_defense
            row["n_defense"] = spec.n_defense
        row["victim_conditional"] = is_conditional(victims.get((r["model"], r["task"], r["attack"], r["seed"])), spec)
        results.append(row)
    write_json_atomic(out / "results.json", {"spec": spec.to_dict(), "command": command, "rows": results})
    write_text_atomic(out / "results.md", render_markdown(results, spec, command))
    plot_asr(results, spec, out / "asr_by_defense.png")
    for r in rows:
        if r["defense"] == "crow" and r.get("profiles"):
            victim = next((v for v in rows if v["victim_key"] == r["victim_key"] and v["defense"] == "none"
                           and v.get("profiles")), None)
            if victim:
                plot_consistency(victim, r, out / f"consistency_{r['model'].replace('/', '_')}_{r['task']}_{r['attack']}.png")
    return {"rows": results}


def _victim_overrides(spec: BenchSpec) -> str:
    """' (except task/attack: key value, ...)' for the cells whose victim recipe differs from the spec's."""
    parts = [f"{cell}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in changes.items())
             for cell, changes in spec.victim_overrides.items() if changes]
    return f" (except {'; '.join(parts)})" if parts else ""


def render_markdown(rows: list[dict], spec: BenchSpec, command: str = "") -> str:
    entries = spec.defense_entries()
    defenses = [e.label for e in entries]
    lines = [f"# Bench: {spec.name} ({spec.suite})", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    e = spec.eval
    fewer = "; ".join(f"{x.label}: {x.n_clean}" for x in entries if x.n_clean != spec.n_defense)
    fewer = f" (except {fewer})" if fewer else ""
    trained = "a 4-layer Llama trained from scratch (all weights)" if spec.suite == "tiny" else f"LoRA r {spec.victim.lora_r}"
    lines += [f"Each cell: ASR % on {e.n_triggered} triggered prompts, with clean perplexity (ppl) and the "
              f"false-trigger rate (FTR %) on {e.n_clean} clean prompts; greedy decoding, {e.max_new_tokens} new tokens, "
              f"samples cut to {spec.max_length} tokens. Victim: {trained}, lr "
              f"{spec.victim.learning_rate}, {spec.victim.epochs:g} epochs on {spec.victim.n_poison} poisoned + "
              f"{spec.victim.n_clean} clean samples{_victim_overrides(spec)}; defenses use {spec.n_defense} clean "
              f"samples{fewer}.",
              f"A victim is *conditional* when its ASR >= {spec.conditional.min_asr:g}% and FTR <= "
              f"{spec.conditional.max_false_trigger_rate:g}% (first prompt format); rows marked with † are not.", ""]
    by_model = defaultdict(list)
    for r in rows:
        by_model[r["model"]].append(r)
    for model, model_rows in by_model.items():
        for fmt in spec.eval.formats:
            lines += [f"## {model}: prompts `{fmt}`" + (" (as trained)" if fmt == "template" else " (official evaluation)"),
                      "", "| task / attack | " + " | ".join(defenses) + " |", "|---|" + "---|" * len(defenses)]
            cells = {(r["task"], r["attack"], r["defense"]): r for r in model_rows}
            order = list(dict.fromkeys((r["task"], r["attack"]) for r in model_rows))
            counted, every_row = [], []  # per row {defense: (asr, ftr, ppl)}: conditional victims; every row
            for task, attack in order:
                victim = cells.get((task, attack, "none"))
                mark = "" if victim is None or victim.get("victim_conditional") is not False else " †"
                entries, values = [], {}
                for d in defenses:
                    r = cells.get((task, attack, d))
                    f = (r or {}).get("by_format", {}).get(fmt)
                    if not f:
                        entries.append("-")
                        continue
                    values[d] = (f["asr"], f["false_trigger_rate"], f["clean_perplexity"])
                    ppl = f["clean_perplexity"]
                    entries.append(f"{f['asr']:.1f} (FTR {f['false_trigger_rate']:.0f}, ppl {ppl:.2f})" if ppl
                                   else f"{f['asr']:.1f} (FTR {f['false_trigger_rate']:.0f})")
                every_row.append(values)
                if not mark:  # a defense is judged on the victims that count
                    counted.append(values)
                lines.append(f"| {task} / {attack}{mark} | " + " | ".join(entries) + " |")
            notes = []
            if not counted:  # no victim counts (the tiny suite's): average every row, and say so
                counted, notes = every_row, ["every row; no victim is conditional"]
            elif len(counted) < len(every_row):
                notes.append("rows without †")
            complete = [v for v in counted if len(v) == len(defenses)]
            if complete and len(complete) < len(counted):  # columns averaged over different rows would not compare
                counted, notes = complete, notes + ["rows every defense has finished"]
            elif not complete and len(counted) > 1:
                notes.append("each column over the rows it has")
            label = "**average**" + (f" ({'; '.join(notes)})" if notes else "")
            sums = {d: [v[d] for v in counted if d in v] for d in defenses}
            avg = []
            for d in defenses:
                vals = sums.get(d)
                if not vals:
                    avg.append("-")
                    continue
                asr, ftr, ppl = (_mean([v[i] for v in vals]) for i in range(3))
                avg.append(f"**{asr:.1f}** (FTR {ftr:.0f}" + (f", ppl {ppl:.2f})" if ppl else ")"))
            lines += [f"| {label} | " + " | ".join(avg) + " |", ""]
        lines += _device_lines(model_rows, defenses)
    return "\n".join(lines)


def _device_lines(rows: list[dict], defenses: list[str]) -> list[str]:
    """Defense times per device (seconds are only comparable on one device), and which cells ran where
    when the rows come from more than one."""
    by_device = defaultdict(list)
    for r in rows:
        by_device[r.get("device") or "device not recorded"].append(r)
    lines = []
    for device, device_rows in by_device.items():
        seconds = defaultdict(list)
        for r in device_rows:
            seconds[r["defense"]].append(r["seconds"])
        where = f" on {device}" if len(by_device) > 1 else f" ({device})"
        if len(by_device) > 1:
            cells = dict.fromkeys(f"{r['task']} / {r['attack']}" for r in device_rows)
            lines += [f"Cells run on {device}: " + ", ".join(cells) + ".", ""]
        lines += [f"Defense time{where} (s, mean per cell): "
                  + ", ".join(f"{d} {_mean(seconds[d]):.0f}" for d in defenses if seconds.get(d)), ""]
    return lines


def plot_asr(rows: list[dict], spec: BenchSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defenses = [e.label for e in spec.defense_entries()]
    groups = list(dict.fromkeys(f"{r['task']}/{r['attack']}" for r in rows))
    if not groups:
        return
    value = {(f"{r['task']}/{r['attack']}", r["defense"]): r["asr"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 4), dpi=120)
    width = 0.8 / max(len(defenses), 1)
    for i, d in enumerate(defenses):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [value.get((grp, d), 0.0) for grp in groups], width, label=d)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, rotation=20, fontsize=8)
    ax.set_ylabel(f"ASR % ({spec.eval.formats[0]} prompts)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"{spec.name}: attack success rate by defense")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_consistency(victim_row: dict, crow_row: dict, path: Path) -> None:
    from ..analysis.profile import plot_profiles

    curves = {f"victim {k}": v for k, v in victim_row["profiles"].items()}
    curves.update({f"crow {k}": v for k, v in crow_row["profiles"].items()})
    plot_profiles(curves, path, title=f"{crow_row['model']} {crow_row['task']}/{crow_row['attack']}: "
                                      "consistency before and after CROW")
