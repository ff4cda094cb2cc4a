"""The experiment's report: report.json, index.md (the tables), plots and sample grids, in OUT/report.

Table 1 has the shape of Emu Table 3 (each QT arm against the pre-trained base: win / tie / lose on the
q-judge, the caption checks' rate, KID); Table 2 the shape of seed 004 Table 5 (the loss ablation: latent
only, latent + pixel, pixel only, against QT-2K latent-only). The win / tie / lose of an arm against a
reference pairs its image with the reference's for the same replicate, prompt and seed; the CI is
annotation.abstats.comparison_summary's cluster bootstrap over prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from annotation.abstats import comparison_summary
from experiment.haystack import PARTS, read_truth
from experiment.quality import estimate
from experiment.run import PROFILES, TIE_MARGIN, arms
from model.evaluation.judges import mean_ci


def _rows(out: Path) -> list[dict]:
    rows = []
    for file in sorted((out / "models").glob("seed-*/judges.parquet")):
        rows += pq.read_table(file).to_pylist()
    return rows


def compare(rows: list[dict], arm: str, reference: str, metric: str = "q") -> dict | None:
    """Win / tie / lose of ``arm`` against ``reference`` on ``metric`` per (replicate, prompt, seed)."""
    ref = {(r["replicate"], r["prompt_id"], r["seed"]): r[metric] for r in rows if r["arm"] == reference}
    outcomes, prompt_of = {}, {}
    for r in rows:
        key = (r["replicate"], r["prompt_id"], r["seed"])
        if r["arm"] != arm or key not in ref:
            continue
        diff = float(r[metric]) - float(ref[key])
        pair = "/".join(map(str, key))
        outcomes[pair] = "a" if diff > TIE_MARGIN else "b" if diff < -TIE_MARGIN else "tie"
        prompt_of[pair] = r["prompt_id"]
    return comparison_summary(outcomes, prompt_of).to_dict() if outcomes else None


def _per_prompt(rows: list[dict], arm: str, metric: str) -> list[float]:
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["arm"] == arm:
            by.setdefault(r["prompt_id"], []).append(float(r[metric]))
    return [float(np.mean(v)) for v in by.values()]


def _fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _wtl(s: dict | None) -> str:
    if s is None:
        return "n/a"
    ci = s["ci"].get("net_win") if s["ci"] else None
    net = f"net {100 * s['net_win']:+.0f}%" + (f" [{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}]" if ci else "")
    return f"{100 * s['win']:.0f} / {100 * s['tie']:.0f} / {100 * s['lose']:.0f} ({net}, p={s['sign_test_p']:.2g})"


def build_report(out: Path) -> Path:
    out = Path(out)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    profile_info = json.loads((out / "profile.json").read_text())
    profile = PROFILES[profile_info["name"]]
    curation = json.loads((out / "curation.json").read_text())
    data = json.loads((out / "data.json").read_text())
    rows = _rows(out)
    reps = sorted((out / "models").glob("seed-*"))
    trained = [json.loads((r / "checkpoints.json").read_text()) for r in reps if (r / "checkpoints.json").is_file()]
    judged = [json.loads((r / "judges.json").read_text()) for r in reps if (r / "judges.json").is_file()]
    skipped = {k: v for t in trained for k, v in t["skipped"].items()}
    present = sorted({r["arm"] for r in rows})
    summary = {}
    for arm in arms(profile):
        if arm.name not in present:
            summary[arm.name] = {"paper": arm.paper, "skipped": skipped.get(arm.name, "no generations")}
            continue
        kids = [j["kid"][arm.name]["mean"] for j in judged if arm.name in j.get("kid", {})]
        summary[arm.name] = {
            "paper": arm.paper, "images": data["counts"].get(arm.data) if arm.data else None,
            "mean_true_q_of_training_set": data["mean_true_q"].get(arm.data) if arm.data else None,
            "q": mean_ci(_per_prompt(rows, arm.name, "q")),
            "parts": {p: float(np.mean([r[p] for r in rows if r["arm"] == arm.name])) for p in PARTS},
            "alignment": mean_ci(_per_prompt(rows, arm.name, "align_all")),
            "alignment_parts": {k: float(np.mean([r[f"align_{k}"] for r in rows if r["arm"] == arm.name]))
                                for k in ("colour", "position", "count")},
            "kid": float(np.mean(kids)) if kids else None, "kid_per_replicate": kids,
            "vs_base": compare(rows, arm.name, "base") if arm.name != "base" else None,
            "vs_base_alignment": compare(rows, arm.name, "base", "align_all") if arm.name != "base" else None,
            "vs_qt2k": compare(rows, arm.name, "qt-2k") if arm.name not in ("qt-2k",) and "qt-2k" in present else None,
        }
    judge_check = _estimator_check(out / "haystack")
    ceiling = [_autoencoder_ceiling(r, Path(data["folders"]["heldout"])) for r in reps if (r / "autoencoder").is_dir()]
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    report = {"profile": profile_info, "curation": curation, "data": {k: data[k] for k in ("counts", "mean_true_q")},
              "arms": summary, "estimator_vs_truth": judge_check, "autoencoder_ceiling": ceiling,
              "tie_margin": TIE_MARGIN,
              "kid_skipped": next((j["kid_skipped"] for j in judged if j.get("kid_skipped")), None),
              "training": [{k: t.get(k) for k in ("seconds", "stopped", "skipped", "pixel_loss_weight")} for t in trained],
              "timings_s": timings, "images_judged": len(rows)}
    (report_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    _plots(summary, curation, report_dir)
    _grids(rows, out, report_dir)
    (report_dir / "index.md").write_text(markdown(report))
    return report_dir


def _estimator_check(haystack: Path, n: int = 300) -> dict:
    """How well the pixel q-estimator tracks the planted q on the haystack (Spearman ρ, per part too)."""
    from PIL import Image
    from scipy.stats import spearmanr

    truth = read_truth(haystack).to_pylist()[:n]
    est = [estimate(Image.open(haystack / t["file_name"])) for t in truth]
    rho = {"q": float(spearmanr([t["q"] for t in truth], [e.q for e in est]).statistic)}
    for p in PARTS:
        rho[p] = float(spearmanr([t[p] for t in truth], [getattr(e, p) for e in est]).statistic)
    align = float(np.mean([e.colour == t["colour"] and e.position == t["position"] and e.count == t["count"]
                           for e, t in zip(est, truth)]))
    return {"images": len(truth), "spearman": rho, "caption_checks_pass_on_haystack": align}


def _autoencoder_ceiling(rep: Path, heldout: Path, n: int = 24) -> dict:
    """What any generator of this replicate can reach at best: the held-out curated images passed through
    its autoencoder (encode, decode), judged like generations. A base cannot draw what the decoder cannot."""
    import torch
    from PIL import Image

    from model.autoencoder import FourierAutoencoderKL, decode_latents, encode_latents

    files = sorted(heldout.glob("*.png"))[:n]
    vae = FourierAutoencoderKL.from_pretrained(rep / "autoencoder").eval()
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)
                     for f in files])
    with torch.no_grad():
        y = decode_latents(vae, encode_latents(vae, x)).clamp(-1, 1)
    images = [Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for im in y]
    original = [estimate(Image.open(f)) for f in files]
    rebuilt = [estimate(im) for im in images]
    metrics = json.loads((rep / "autoencoder" / "metrics.json").read_text()) if (rep / "autoencoder" / "metrics.json").is_file() else {}
    return {"replicate": rep.name, "images": len(files), "psnr": metrics.get("psnr"), "ssim": metrics.get("ssim"),
            "q_original": float(np.mean([e.q for e in original])), "q_reconstructed": float(np.mean([e.q for e in rebuilt])),
            "subject_found_original": float(np.mean([e.colour is not None for e in original])),
            "subject_found_reconstructed": float(np.mean([e.colour is not None for e in rebuilt]))}


def markdown(report: dict) -> str:
    arms_ = report["arms"]
    p = report["profile"]
    lines = [f"# Small-scale quality-tuning experiment (profile `{p['name']}`, {p['size']} px)", "",
             f"Haystack {p['haystack']} images; replicates (training seeds) {p['replicates']}; "
             f"{p['n_prompts']} grammar prompts x {p['gen_seeds']} seeds per arm and replicate; "
             f"{p['gen_steps']} sampling steps. Images judged: {report['images_judged']}.", "",
             "## Curation funnel (true q known)", "", "| stage | images | mean true q |", "| --- | --- | --- |"]
    for stage, count in report["curation"]["funnel"].items():
        lines.append(f"| {stage} | {count} | {_fmt(report['curation']['mean_q'][stage])} |")
    ec = report["estimator_vs_truth"]
    lines += ["", f"q-estimator against the planted q on {ec['images']} haystack images: Spearman ρ "
              + ", ".join(f"{k} {v:.2f}" for k, v in ec["spearman"].items())
              + f"; caption checks pass on {100 * ec['caption_checks_pass_on_haystack']:.0f}% of haystack images.", ""]
    for c in report.get("autoencoder_ceiling", []):
        lines += [f"Autoencoder ceiling ({c['replicate']}): PSNR {_fmt(c['psnr'], 1)} dB, SSIM {_fmt(c['ssim'], 2)}; "
                  f"{c['images']} held-out curated images judged q {c['q_original']:.3f} as they are and "
                  f"{c['q_reconstructed']:.3f} after encode-decode; a subject is found in "
                  f"{100 * c['subject_found_original']:.0f}% of them before and {100 * c['subject_found_reconstructed']:.0f}% after.", ""]
    lines += [
              "## Table 1 (the shape of Emu Table 3): each arm against the pre-trained base", "",
              f"win / tie / lose in % of (replicate, prompt, seed) pairs on the q-judge (tie: |Δq| < {report['tie_margin']}), "
              "net win with its 95% cluster-bootstrap CI over prompts and the sign-test p; the caption checks "
              "(colour, position and count all right) and KID against held-out curated images (lower is better).", "",
              "| arm | what | images | true q of its set | mean q [95% CI] | q vs base: win / tie / lose | "
              "q vs qt-2k: win / tie / lose | caption checks | KID |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in arms_.items():
        if "skipped" in a:
            lines.append(f"| {name} | {a['paper']} | | | skipped: {a['skipped'][:160]} | | | | |")
            continue
        q = a["q"]
        ci = f" [{q['ci'][0]:.3f}, {q['ci'][1]:.3f}]" if q["ci"] else ""
        lines.append(f"| {name} | {a['paper']} | {a['images'] or ''} | {_fmt(a['mean_true_q_of_training_set'])} | "
                     f"{_fmt(q['mean'])}{ci} | {_wtl(a['vs_base'])} | {_wtl(a['vs_qt2k'])} | {_fmt(a['alignment']['mean'], 2)} | "
                     f"{_fmt(a['kid'], 4)} |")
    lines += ["", "## Table 2 (the shape of seed 004 Table 5): the loss ablation, against QT-2K (latent only)", "",
              "| arm | mean q | flaws | subject/background | q vs qt-2k: win / tie / lose | caption checks | KID |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("qt-2k", "qt-2k-pixel", "pixel-only"):
        a = arms_.get(name, {})
        if not a or "skipped" in a:
            lines.append(f"| {name} | skipped: {a.get('skipped', 'absent')[:200]} | | | | | |")
            continue
        lines.append(f"| {name} | {_fmt(a['q']['mean'])} | {_fmt(a['parts']['flaws'])} | "
                     f"{_fmt(a['parts']['subject_background'])} | {_wtl(a['vs_qt2k']) if name != 'qt-2k' else '(reference)'} | "
                     f"{_fmt(a['alignment']['mean'], 2)} | {_fmt(a['kid'], 4)} |")
    if report.get("kid_skipped"):
        lines += ["", f"KID: {report['kid_skipped']}"]
    lines += ["", "## Parts of q per arm (mean over generations)", "",
              "| arm | " + " | ".join(PARTS) + " | colour | position | count |",
              "| --- | " + " | ".join("---" for _ in PARTS) + " | --- | --- | --- |"]
    for name, a in arms_.items():
        if "skipped" not in a:
            lines.append(f"| {name} | " + " | ".join(_fmt(a["parts"][x], 2) for x in PARTS) + " | "
                         + " | ".join(_fmt(a["alignment_parts"][k], 2) for k in ("colour", "position", "count")) + " |")
    lines += ["", "![q per arm](q_per_arm.png) ![funnel](funnel.png)", "", "Sample grids (rows: arms; columns: the "
              "same prompts and seeds): ![samples](samples.png)", "",
              "Wall time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings_s"].items())]
    return "\n".join(lines) + "\n"


def _plots(summary: dict, curation: dict, report_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, a in summary.items() if "skipped" not in a]
    means = [summary[n]["q"]["mean"] for n in names]
    errs = [[m - (summary[n]["q"]["ci"] or [m, m])[0] for n, m in zip(names, means)],
            [(summary[n]["q"]["ci"] or [m, m])[1] - m for n, m in zip(names, means)]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(names, means, yerr=errs, color=["grey"] + ["tab:blue"] * (len(names) - 1), capsize=3)
    ax.set_ylabel("mean estimated q of generations")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(report_dir / "q_per_arm.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    stages = list(curation["funnel"])
    ax.plot(stages, [curation["mean_q"][s] for s in stages], marker="o")
    for s in stages:
        ax.annotate(str(curation["funnel"][s]), (s, curation["mean_q"][s]), textcoords="offset points", xytext=(0, 6))
    ax.set_ylabel("mean true q (labels: images)")
    fig.tight_layout()
    fig.savefig(report_dir / "funnel.png", dpi=100)
    plt.close(fig)


def _grids(rows: list[dict], out: Path, report_dir: Path, n: int = 8) -> None:
    from PIL import Image, ImageDraw

    first = [r for r in rows if r["replicate"] == min(x["replicate"] for x in rows)] if rows else []
    keys = sorted({(r["prompt_id"], r["seed"]) for r in first})[:n]
    arms_ = list(dict.fromkeys(r["arm"] for r in first))
    if not keys:
        return
    cell, label = 96, 90
    grid = Image.new("RGB", (label + cell * len(keys), cell * len(arms_)), "white")
    draw = ImageDraw.Draw(grid)
    by = {(r["arm"], r["prompt_id"], r["seed"]): r["image_path"] for r in first}
    for i, arm in enumerate(arms_):
        draw.text((4, i * cell + cell // 2 - 6), arm, fill="black")
        for j, key in enumerate(keys):
            path = by.get((arm, *key))
            if path:
                grid.paste(Image.open(out / path).convert("RGB").resize((cell, cell), Image.NEAREST), (label + j * cell, i * cell))
    grid.save(report_dir / "samples.png")
