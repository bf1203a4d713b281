"""The dense example scripts and the dense demo, called through their `main()` with tiny models."""

import sys

from transformers import UperNetForSemanticSegmentation

from g2sd_hf import G2SDBackbone
from g2sd_hf.dense_models import (
    find_backbone,
)

from .conftest import assert_card_lists_every_metric, command_line
from .dense_helpers import EXAMPLES


def test_dense_example_scripts_with_and_without_a_teacher(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import run_object_detection
    import run_semantic_segmentation

    tiny = "image_size=32,patch_size=8,hidden_size={},num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
    common = command_line(
        "do_train",
        "do_eval",
        image_size=32,
        fpn_hidden_size=32,
        head_hidden_size=32,
        synthetic_train_size=16,
        synthetic_validation_size=8,
        dataset_name="synthetic-shapes",
        max_steps=2,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        disable_tqdm="true",
        logging_steps=1,
    )
    runs = {}
    for script, extra in (
        (run_semantic_segmentation, []),
        (run_object_detection, ["--num_queries", "10", "--encoder_layers", "1", "--decoder_layers", "2"]),
    ):
        teacher = tmp_path / f"{script.__name__}-teacher"
        metrics = script.main(["--output_dir", str(teacher), "--backbone_overrides", tiny.format(64), *common, *extra])
        assert ("eval_mean_iou" in metrics) or ("eval_map" in metrics)
        runs[teacher.name] = metrics
        student = tmp_path / f"{script.__name__}-student"
        runs[student.name] = script.main(
            [
                "--output_dir",
                str(student),
                "--backbone_overrides",
                tiny.format(32),
                "--teacher_name_or_path",
                str(teacher),
                *common,
                *extra,
            ]
        )
        assert "score_distillation_loss" in (student / "trainer_state.json").read_text()
    card = (tmp_path / "run_semantic_segmentation-student" / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "specific distillation for semantic segmentation" in card
    assert "| mean IoU | `mean_iou` |" in card
    detection_card = (tmp_path / "run_object_detection-teacher" / "README.md").read_text()
    assert "pipeline_tag: object-detection" in detection_card and "| box mAP (IoU 0.50) | `map_50` |" in detection_card
    # Every card the dense scripts write parses into the Hub's eval results.
    for folder, metrics in runs.items():
        task = "semantic-segmentation" if "segmentation" in folder else "object-detection"
        results = assert_card_lists_every_metric(tmp_path / folder, metrics, task, "synthetic-shapes")
        assert {"mean_iou"} <= {result.metric_type for result in results} or "map" in {r.metric_type for r in results}
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "run_semantic_segmentation-student")
    assert isinstance(find_backbone(reloaded), G2SDBackbone)


def test_dense_demo_smoke_scale_writes_its_tables_and_reuses_finished_stages(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import run_dense_demo

    first = run_dense_demo.main(["--output_dir", str(tmp_path), "--scale", "smoke"])
    table = (tmp_path / "dense_results.md").read_text()
    assert "| Student, distilled from the teacher |" in table and "## Detection" in table and "mean_iou" in table
    assert all(not row["reused"] for rows in first["tasks"].values() for row in rows.values())
    again = run_dense_demo.main(["--output_dir", str(tmp_path), "--scale", "smoke"])
    assert all(row["reused"] for rows in again["tasks"].values() for row in rows.values())
    assert (
        again["tasks"]["segmentation"]["distilled"]["mean_iou"]
        == first["tasks"]["segmentation"]["distilled"]["mean_iou"]
    )
