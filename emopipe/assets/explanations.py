"""explanations: Integrated-Gradients heatmaps (captum) of sample test images per class, as the ViT study showed."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import ARRAY_ASSETS, CODE_VERSION, database, experiment, experiment_partitions, png_markdown, versioned_output
from emopipe.core.evaluation import evaluated_images
from emopipe.core.explanation_store import heatmaps_key, stored_heatmaps, write_heatmaps
from emopipe.core.images import load_array
from emopipe.paths import data_dir


@dg.asset(
    partitions_def=experiment_partitions,
    code_version=CODE_VERSION,
    group_name="evaluation",
    kinds={"captum", "pytorch"},
    ins={"trained_model": dg.AssetIn()},
    deps=ARRAY_ASSETS,  # predicts from the arrays at the model's image size
    pool="gpu",  # the model runs on the GPU when there is one
    description=(
        "For `explain_per_class` test images per class (correct predictions first, a fixed choice), the predicted "
        "class, its probability, and the Integrated-Gradients attribution of the stored pixels as a heatmap overlay."
    ),
)
def explanations(context: dg.AssetExecutionContext, duckdb: DuckDBResource, trained_model: dict) -> dg.Output[dict]:
    exp = experiment(context)
    if exp.task != "classification" or exp.explain_per_class == 0:
        return versioned_output({"images": []}, {"explained": 0}, "none")
    db = database(duckdb)
    model_id = trained_model["model_id"]
    test = evaluated_images(db, exp.dataset, trained_model["split_id"], "test")
    ids = [i for i, _, _ in test]
    folder = data_dir() / "reports" / f"{exp.name}-{model_id[:12]}-ig"
    key = heatmaps_key(model_id=model_id, split_id=trained_model["split_id"], test_ids=ids, per_class=exp.explain_per_class)
    stored = stored_heatmaps(folder, key)
    if stored is not None:
        context.log.info(f"reused {len(stored)} heatmaps from {folder}: same model, test images and settings")
    heatmaps = stored if stored is not None else write_heatmaps(
        folder, key, _draw_heatmaps(db, trained_model["checkpoint_path"], test, exp.explain_per_class))
    metadata = {"explained": len(heatmaps), "model_id": model_id, "reused": stored is not None,
                "summary": f"{len(heatmaps)} heatmaps" + (" reused" if stored is not None else " drawn")}
    for h in heatmaps:
        metadata[f"heatmap {h.label} {h.image_id[:12]}"] = png_markdown(
            (folder / h.file).read_bytes(), f"IG heatmap of {h.image_id[:12]} ({h.label})")
    return versioned_output({"images": [h.image_id for h in heatmaps]}, metadata, model_id)


def _draw_heatmaps(db, checkpoint: str, test: list[tuple], per_class: int) -> list[tuple[str, str, bytes]]:
    """(label, image_id, overlay PNG) of the chosen test images."""
    # torch, timm and captum: only when drawing
    from emopipe.core.explanations import caption, explain, overlay_png, select_samples
    from emopipe.core.trained_model import load_checkpoint, predict

    model, info = load_checkpoint(checkpoint)
    classes = info["classes"]
    ids = [i for i, _, _ in test]
    x = load_array(db, ids, info["image_size"])
    probs = predict(model, info, x)
    rows = [(i, label, classes[p]) for (i, label, _), p in zip(test, probs.argmax(1))]
    chosen = select_samples(rows, per_class, classes)
    index = [ids.index(image_id) for image_id, _, _ in chosen]
    targets = [int(probs[i].argmax()) for i in index]
    heat = explain(model, info, x[index], targets)
    return [(label, image_id, overlay_png(x[i], heat[k], caption(classes[t], float(probs[i, t]), label)))
            for k, ((image_id, label, _), i, t) in enumerate(zip(chosen, index, targets))]
