"""The dataset card (README.md of an export), written from submission.json's contents alone."""

from __future__ import annotations

from ..core.classes import VOC_CLASSES
from ..core.config import LabelConfig, RefineConfig
from ..core.gate import gate_rule, refine_config
from ..core.guided import recorded_label_config

OTHER_LICENCES = (
    ("DeepLabv3 / LR-ASPP code (torchvision)", "BSD-3-Clause"),
    ("syntagen_st (the code that made the data)", "MIT"),
)


def _model_line(sd: dict) -> str:
    where = sd.get("kind", "")
    if sd.get("sha256"):
        where += f", files sha256 {sd['sha256']}"
    if sd.get("revision"):
        where += f", revision {sd['revision']}"
    if sd.get("commit"):
        where += f", commit {sd['commit']}"
    return f"`{sd['id']}` (SD {sd.get('family', 'unknown')}; {where})"


def _class_table(classes: dict) -> list[str]:
    labelled = sum(v["pixels"] for k, v in classes.items() if k != "ignore") or 1
    rows = ["| class | images | pixels | share of labelled pixels |", "| --- | ---: | ---: | ---: |"]
    for name in [*VOC_CLASSES, "ignore"]:
        v = classes.get(name, {"images": 0, "pixels": 0})
        share = "" if name == "ignore" else f"{100 * v['pixels'] / labelled:.2f}%"
        label = "ignore (255, unsure)" if name == "ignore" else name
        rows.append(f"| {label} | {v['images']} | {v['pixels']} | {share} |")
    return rows


def crf_line(label: LabelConfig) -> str:
    """The dense CRF's settings, as the card names them."""
    return (f"refined by the image with a fully connected CRF (pydensecrf, {label.crf_iterations} mean-field iterations; "
            f"appearance kernel {label.crf_spatial:g} of the shorter side and {label.crf_colour:g} RGB levels, weight "
            f"{label.crf_weight:g}; smoothness kernel {label.crf_smooth:g} px, weight {label.crf_smooth_weight:g}"
            + (f"; solved at about {label.crf_work_side} px a side" if label.crf_work_side else "") + ")")


def colour_line(label: LabelConfig) -> str:
    """The colour model's settings, as the card names them before the refinement; "" when off."""
    reach = (f", a class's colour claimed within about {label.colour_reach:g} of the shorter side of its own pixels"
             if label.colour_reach is not None else "")
    return (f"weighed by the image's colour model of each class (RGB histograms of {label.colour_bins} levels a "
            f"channel, each class's pixel count to the power {label.colour_class_power:g}, the model to the power "
            f"{label.colour_weight:g}{reach}), then " if label.colour_weight else "")


def _labels_line(cfg: dict) -> str:
    """How the masks were made: from attention, or imported; with the image-guided refinement when
    it was on (a config recorded before it existed lacks ``refine_image``: off)."""
    label = recorded_label_config(cfg["label"])

    def snap(kernel: float) -> str:
        return (f"kornia's guided filter (window {kernel:g} of the shorter side, "
                f"eps {label.refine_eps:g}, coefficients computed at about {label.refine_work_side} px)")

    if str(cfg["loop"].get("source", "sd")).startswith("folder:"):
        passes = "once" if label.prior_passes == 1 else f"in {label.prior_passes} passes, each from the last one's label"
        how = colour_line(label) + (crf_line(label) if label.prior_method == "crf" else
                                    f"snapped to the image's edges with {snap(label.prior_kernel or label.refine_kernel)} {passes}")
        return ("- **Labels**: imported as given." if not label.refine_image else
                f"- **Labels**: imported, each mask refined as a prior ({label.prior_confidence:g} on its class, the rest "
                f"shared over background and its classes, uniform where it was 255), {how}; a pixel takes its most "
                f"probable class, and a 255 pixel stays 255 unless that reaches {label.fg_threshold}"
                + ("; a pixel the mask gave a class or 255 that comes out background is 255" if label.prior_doubt
                   else "")
                + ("; a label that places no pixel of a class it names keeps no background (255)." if label.absent_doubt
                   else "."))
    return (f"- **Labels**: cross-attention of the class tokens refined by self-attention to the power {label.tau}"
            + (f", upsampled to the image and snapped to its edges with {snap(label.refine_kernel)}" if label.refine_image else "") + "; "
            f"a class where its score >= {label.fg_threshold}, 255 in [{label.band_threshold}, {label.fg_threshold}), "
            f"background below; classes under {label.presence_threshold} of the strongest peak are absent.")


def _relabel_view(refine: RefineConfig, cfg: dict) -> str:
    """What the relabel reads besides the model, when ``relabel_image`` was on."""
    if not refine.relabel_image:
        return ""
    label = recorded_label_config(cfg["label"])
    how = colour_line(label) + (crf_line(label) if refine.relabel_method == "crf" else
                                f"snapped to the image with kornia's guided filter (window {refine.relabel_kernel:g} of the shorter side)")
    return f" (its softmax times the label's prior at {refine.relabel_prior:g}, {how})"


def render_card(sub: dict) -> str:
    cfg = sub["config"]
    gen, refine, loop, train = cfg["generate"], cfg["refine"], cfg["loop"], cfg["train"]
    recorded = refine_config(refine)  # the refine section as it ran, settings it predates included
    sd = sub["stable_diffusion"]
    lines = [f"# {sub['name']}: a synthetic PASCAL VOC segmentation dataset", ""]
    if not sub["valid_entry"]:
        lines += ["> **Not a valid SyntaGen competition entry**: " + "; ".join(sub["not_an_entry"]) + ".", ""]
    lines += [
        f"{sub['pairs']} image / mask pairs made by syntagen_st from `{sd['id']}` alone, for the CVPR 2024 "
        "SyntaGen competition's rules (at most 10,000 pairs of 512x512 images, the 21 VOC labels).",
        "",
        "- `image/<id>.jpg`: RGB, JPEG quality 95; `mask/<id>.png`: 8-bit palette PNG with the VOC palette, "
        "values 0..20, 255 where the label is unsure; `train.txt`: the ids;",
        "- `VOCdevkit/VOC2012/`: links to the same files, as torchvision's `VOCSegmentation` reads them;",
        "- `submission.json`: seed, config, model, library versions, checksums, class counts, every sample's prompt and seed.",
        "",
        "## How it was made",
        "",
        f"- **Images**: Stable Diffusion {_model_line(sd)}; {gen['height']}x{gen['width']} px, {gen['steps']} steps, "
        f"guidance {gen['guidance_scale']}, scheduler `{cfg['model']['scheduler']}`, run seed {sub['seed']} "
        "(each sample's noise and prompt come from its own seed, derived from the run seed and its id).",
        "- **Prompts**: " + (f"the prompts file (sha256 {sub['prompts_file_sha256']})" if sub.get("prompts_file_sha256")
                             else f"built-in caption templates over {len(gen['classes'])} classes, at most "
                             f"{gen['max_classes_per_prompt']} per prompt") + "; the class names are appended after `; `.",
        _labels_line(cfg),
        f"- **Self-training**: {loop['rounds']} rounds, {loop['generate_total']} images generated "
        f"(budget split `{loop['budget_split']}`), {refine['folds']} cross-fitted round models of {loop['round_steps']} steps.",
        f"- **Relabel**: where the held-out model{_relabel_view(recorded, cfg)} is >= {refine['relabel_confidence']} "
        "confident, in the classes that "
        f"pass the gate: {gate_rule(recorded)}. Disagreements where neither is sure become 255"
        + ("." if recorded.background_when_blind else
           "; on a sample naming a class the model has not learnt, the model writes no background."),
        f"- **Filter**: each sample judged once; the worst {refine['drop_fraction']:.0%} by model-label agreement dropped"
        + ("." if recorded.score_blind_classes else ", classes the model has not learnt left out of the agreement."),
        f"- **Steer**: weak classes get more of the next round's prompts (weakness power {refine['weakness_power']}, "
        f"floor {refine['min_weight']}).",
        f"- **Selection**: the best <= {loop['max_pairs']} kept samples.",
        f"- **Final model**: {train['arch']}, batch {train['batch_size']}, {train['max_steps']} iterations, trained on "
        "exactly these files: " + (f"sha256 `{sub['model_sha256']}`." if sub.get("model_sha256") else "not trained yet."),
        "",
        "## Class statistics",
        "",
        *_class_table(sub["classes"]),
        "",
        "## Licences",
        "",
        "| component | licence |",
        "| --- | --- |",
        f"| Stable Diffusion weights `{sd['id']}` | {sd.get('licence') or 'see the model card of ' + sd['id']}: "
        "its use-based restrictions apply to the use of these images |",
        *(f"| {what} | {lic} |" for what, lic in OTHER_LICENCES),
        "",
        "## Reproduce",
        "",
        "```bash",
        "python -m syntagen_st.validate THIS_FOLDER_OR_ZIP            # the competition's rules and every checksum",
        "python -m syntagen_st.reproduce THIS_FOLDER_OR_ZIP --sample 20  # regenerate 20 samples from the seed and compare",
        "python -m syntagen_st.reproduce THIS_FOLDER_OR_ZIP --full       # rerun fit from the recorded config, compare",
        "```",
        "",
        "`--full` is `python -m syntagen_st.fit --config config.yaml`, with config.yaml the `config` of submission.json. "
        "Byte-identical results need the same hardware and library versions:",
        "",
        *(f"- {name} {version}" for name, version in sub["versions"].items() if version),
        "",
    ]
    return "\n".join(lines)
