"""explanations: Integrated-Gradients heatmaps (captum) of sample test images per class, as the ViT study showed."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import ARRAY_ASSETS, CODE_VERSION, database, experiment, experiment_partitions, png_markdown, versioned_output
from emopipe.core.evaluation import evaluated_images
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
    # torch, timm and captum: only in this step
    from emopipe.core.explanations import caption, explain, overlay_png, select_samples
    from emopipe.core.trained_model import load_checkpoint, predict

    db = database(duckdb)
    model, info = load_checkpoint(trained_model["checkpoint_path"])
    classes = info["classes"]
    test = evaluated_images(db, exp.dataset, trained_model["split_id"], "test")
    ids = [i for i, _, _ in test]
    x = load_array(db, ids, info["image_size"])
    probs = predict(model, info, x)
    rows = [(i, label, classes[p]) for (i, label, _), p in zip(test, probs.argmax(1))]
    chosen = select_samples(rows, exp.explain_per_class, classes)
    index = [ids.index(image_id) for image_id, _, _ in chosen]
    targets = [int(probs[i].argmax()) for i in index]
    heat = explain(model, info, x[index], targets)
    out = data_dir() / "reports" / f"{exp.name}-{trained_model['model_id'][:12]}-ig"
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"explained": len(chosen), "model_id": trained_model["model_id"]}
    for k, ((image_id, label, _), i, t) in enumerate(zip(chosen, index, targets)):
        png = overlay_png(x[i], heat[k], caption(classes[t], float(probs[i, t]), label))
        (out / f"{label}-{image_id[:12]}.png").write_bytes(png)
        metadata[f"{label}: {image_id[:12]}"] = png_markdown(png, f"IG heatmap of {image_id[:12]}")
    return versioned_output({"images": [c[0] for c in chosen]}, metadata, trained_model["model_id"])
