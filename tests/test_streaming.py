"""Streaming (issue 20): tar shards written from a folder, the streamed generic distillation, its exact resume, the
bad input it refuses, and two machines (two `accelerate launch --num_machines 2` processes, CPU, gloo)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from transformers import ViTImageProcessor

from g2sd_hf import GenericDistillationTrainer
from g2sd_hf.shards import write_shards
from g2sd_hf.streaming import load_image_stream

from .conftest import NORMALIZATION, SHAPES_STUDENT, tiny_mae_teacher


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import run_generic  # noqa: E402


@pytest.fixture(scope="module")
def shards(shapes_folder, tmp_path_factory):
    """The 192 training shapes as 8 shards of 24 images, and a tiny MAE teacher."""
    root = tmp_path_factory.mktemp("streaming")
    write_shards(str(shapes_folder / "train"), str(root / "shards"), images_per_shard=24)
    tiny_mae_teacher().save_pretrained(root / "mae")
    ViTImageProcessor(size={"height": 32, "width": 32}, **NORMALIZATION).save_pretrained(root / "mae")
    return root


def test_shards_hold_every_image_once_under_its_path_and_nothing_is_overwritten(shapes_folder, shards, tmp_path):
    written = sorted((shards / "shards").glob("*.tar"))
    assert [path.name for path in written] == [f"shard-{index:06d}.tar" for index in range(8)]
    members = [name for path in written for name in tarfile.open(path).getnames()]
    expected = sorted(
        str(path.relative_to(shapes_folder / "train")) for path in (shapes_folder / "train").rglob("*.png")
    )
    assert sorted(members) == expected and len(expected) == 192
    # The bytes are the file's, not re-encoded.
    with tarfile.open(written[0]) as archive:
        member = archive.getmembers()[0]
        assert archive.extractfile(member).read() == (shapes_folder / "train" / member.name).read_bytes()
    stream = load_image_stream(train_dir=str(shards / "shards"))
    assert stream.n_shards == 8
    ids = [example["image_id"] for example in stream]
    assert len(ids) == 192 == len(set(ids)) and ids[0] == "shard-000000.tar/" + members[0].removesuffix(".png")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"taken already exists and is not an empty folder"):
        write_shards(str(shapes_folder / "train"), str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def streaming_arguments(data, output_dir, teacher, *extra: str) -> list[str]:
    return [
        f"--train_dir={data}",
        f"--output_dir={output_dir}",
        f"--teacher_name_or_path={teacher}",
        "--target_layer=2",
        f"--config_overrides={SHAPES_STUDENT}",
        "--recipe=small-data",
        "--streaming",
        "--max_steps=8",
        "--save_steps=3",
        "--per_device_train_batch_size=8",
        "--shuffle_buffer_size=32",
        "--dataloader_num_workers=2",
        "--logging_steps=1",
        "--report_to=none",
        "--seed=0",
        "--do_train",
        *extra,
    ]


class Interrupted(Exception):
    pass


COMPUTE_LOSS = GenericDistillationTrainer.compute_loss


def recorded_run(monkeypatch, arguments, stop_at: int | None = None) -> dict[int, list[str]]:
    """Run `run_generic.main`, recording the images of each training step; stop with an error at step `stop_at`."""
    seen = {}

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            step = self.state.global_step + 1
            if step == stop_at:
                raise Interrupted(f"stopped at step {step}")
            seen[step] = self.batch_image_ids
        return COMPUTE_LOSS(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(GenericDistillationTrainer, "compute_loss", recording)
    if stop_at is None:
        run_generic.main(arguments)
    else:
        with pytest.raises(Interrupted):
            run_generic.main(arguments)
    return seen


def test_a_stopped_streaming_run_resumes_with_exactly_the_images_of_an_uninterrupted_run(
    shards, tmp_path, monkeypatch
):
    uninterrupted = recorded_run(monkeypatch, streaming_arguments(shards / "shards", tmp_path / "a", shards / "mae"))
    assert sorted(uninterrupted) == list(range(1, 9))
    assert all(len(ids) == 8 for ids in uninterrupted.values())
    first_pass = [image for step in range(1, 9) for image in uninterrupted[step]]
    assert len(set(first_pass)) > 50  # shuffled across shards, not one shard's images over and over

    before = recorded_run(
        monkeypatch, streaming_arguments(shards / "shards", tmp_path / "b", shards / "mae"), stop_at=5
    )
    assert sorted(before) == [1, 2, 3, 4] and (tmp_path / "b" / "checkpoint-3").is_dir()
    # The plain rerun resumes its last checkpoint (step 3): steps 4-8 again, with the images they had.
    after = recorded_run(monkeypatch, streaming_arguments(shards / "shards", tmp_path / "b", shards / "mae"))
    assert sorted(after) == [4, 5, 6, 7, 8]
    assert {**before, **after} == uninterrupted
    assert after[4] == before[4]


def test_streaming_refuses_what_it_cannot_do_before_any_work(shards, tmp_path):
    teacher = shards / "mae"
    without_steps = [argument for argument in streaming_arguments(shards / "shards", tmp_path / "x", teacher)]
    without_steps.remove("--max_steps=8")
    with pytest.raises(ValueError, match=r"--streaming reads an endless stream.*--max_steps"):
        run_generic.main(without_steps)
    with pytest.raises(ValueError, match=r"--do_eval scores a --validation_dir"):
        run_generic.main(streaming_arguments(shards / "shards", tmp_path / "x", teacher, "--do_eval"))
    with pytest.raises(ValueError, match=r"the stream is every training image.*--unlabeled_train_dir"):
        run_generic.main(
            streaming_arguments(shards / "shards", tmp_path / "x", teacher, f"--unlabeled_train_dir={tmp_path}")
        )
    with pytest.raises(ValueError, match=r"--max_image_side re-encodes a table"):
        run_generic.main(streaming_arguments(shards / "shards", tmp_path / "x", teacher, "--max_image_side=64"))
    assert not (tmp_path / "x").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("the shards are elsewhere")
    with pytest.raises(ValueError, match=r"empty holds no .tar shard and no image file.*g2sd_hf.shards"):
        run_generic.main(streaming_arguments(empty, tmp_path / "w", teacher))

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "shard-000000.tar").write_bytes(b"this is not a tar file")
    with pytest.raises(ValueError, match=r"shard-000000.tar cannot be read as a tar file"):
        run_generic.main(streaming_arguments(broken, tmp_path / "y", teacher))
    texts = tmp_path / "texts"
    texts.mkdir()
    with tarfile.open(texts / "shard-000000.tar", "w") as archive:
        note = tmp_path / "note.txt"
        note.write_text("no image here")
        archive.add(note, arcname="sample0.txt")
    with pytest.raises(ValueError, match=r"shard-000000.tar holds no image among its first files"):
        run_generic.main(streaming_arguments(texts, tmp_path / "z", teacher))


RECORDER = """
import json, os, sys
sys.path.insert(0, {examples!r})
import run_generic
from g2sd_hf import GenericDistillationTrainer

compute_loss = GenericDistillationTrainer.compute_loss
rank, stop_at = int(os.environ["RANK"]), int(os.environ.get("STOP_AT", "0"))


def recording(self, model, inputs, *args, **kwargs):
    loss = compute_loss(self, model, inputs, *args, **kwargs)
    if model.training:
        step = self.state.global_step + 1
        if step == stop_at:
            raise SystemExit(3)
        with open(os.path.join({record!r}, f"rank{{rank}}.jsonl"), "a") as handle:
            handle.write(json.dumps({{"step": step, "ids": self.batch_image_ids, "loss": loss.item()}}) + "\\n")
    return loss


GenericDistillationTrainer.compute_loss = recording
run_generic.main(sys.argv[1:])
"""


def launch_two_machines(shards, output_dir, record, port: int, stop_at: int = 0) -> list[int]:
    """Machine ranks 0 and 1, one process each, on this host (CPU, gloo): what `accelerate launch` runs on 2 nodes."""
    record.mkdir(exist_ok=True)
    script = record / "recorder.py"
    script.write_text(RECORDER.format(examples=str(EXAMPLES), record=str(record)))
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "true",
        "STOP_AT": str(stop_at),
    }
    accelerate = str(Path(sys.executable).parent / "accelerate")
    arguments = streaming_arguments(shards / "shards", output_dir, shards / "mae", "--max_steps=12")
    arguments.remove("--max_steps=8")
    processes = [
        subprocess.Popen(
            [
                accelerate,
                "launch",
                "--multi_gpu",
                "--num_machines=2",
                f"--machine_rank={machine}",
                "--num_processes=2",
                "--main_process_ip=127.0.0.1",
                f"--main_process_port={port}",
                "--mixed_precision=no",
                "--dynamo_backend=no",
                str(script),
                *arguments,
            ],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for machine in (0, 1)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    if stop_at == 0:
        for process, output in zip(processes, outputs):
            assert process.returncode == 0, output[-3000:]
    return [process.returncode for process in processes]


def read_record(record) -> dict[int, dict[int, dict]]:
    steps = {}
    for rank in (0, 1):
        lines = (record / f"rank{rank}.jsonl").read_text().splitlines()
        steps[rank] = {entry["step"]: entry for entry in map(json.loads, lines)}
    return steps


@pytest.mark.skipif(not (Path(sys.executable).parent / "accelerate").exists(), reason="accelerate CLI not installed")
def test_two_machines_read_disjoint_shards_average_their_losses_and_resume_exactly(shards, tmp_path):
    launch_two_machines(shards, tmp_path / "out", tmp_path / "whole", port=29531)
    seen = read_record(tmp_path / "whole")
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(1, 13))
    shards_of = {
        rank: {image.split("/")[0] for entry in seen[rank].values() for image in entry["ids"]} for rank in seen
    }
    assert not shards_of[0] & shards_of[1]  # each machine reads its own shards...
    assert shards_of[0] | shards_of[1] == {f"shard-{index:06d}.tar" for index in range(8)}  # ...together all of them
    # One loss per step, the mean of the two machines' (logged by rank 0 only, into one folder).
    logged = {
        entry["step"]: entry["loss"]
        for entry in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    }
    for step in range(1, 13):
        mean = (seen[0][step]["loss"] + seen[1][step]["loss"]) / 2
        assert logged[step] == pytest.approx(mean, rel=1e-4, abs=1e-6)
    assert sorted(path.name for path in (tmp_path / "out").glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]

    # Stopped at step 8 on both machines, then launched again: it resumes checkpoint-6 and each machine trains steps
    # 7-12 on the images it had.
    codes = launch_two_machines(shards, tmp_path / "again", tmp_path / "stopped", port=29532, stop_at=8)
    assert codes != [0, 0] and not (tmp_path / "again" / "model.safetensors").exists()
    launch_two_machines(shards, tmp_path / "again", tmp_path / "resumed", port=29533)
    before, after = read_record(tmp_path / "stopped"), read_record(tmp_path / "resumed")
    for rank in (0, 1):
        assert sorted(after[rank]) == list(range(7, 13))
        combined = {**{step: entry["ids"] for step, entry in before[rank].items() if step <= 6}}
        combined.update({step: entry["ids"] for step, entry in after[rank].items()})
        assert combined == {step: entry["ids"] for step, entry in seen[rank].items()}


def test_a_checkpoint_is_resumed_only_by_a_run_that_reads_the_data_the_same_way(shards, tmp_path):
    arguments = streaming_arguments(shards / "shards", tmp_path / "streamed", shards / "mae")
    arguments[arguments.index("--max_steps=8")] = "--max_steps=3"
    run_generic.main(arguments)
    not_streamed = [argument for argument in arguments if argument != "--streaming"]
    not_streamed[1] = f"--output_dir={tmp_path / 'other'}"
    not_streamed += [f"--resume_from_checkpoint={tmp_path / 'streamed' / 'checkpoint-3'}"]
    with pytest.raises(
        ValueError, match=r"checkpoint of a run with --streaming true, and this run has --streaming false"
    ):
        run_generic.main(not_streamed)


def test_mae_pretraining_streams_and_a_bad_image_in_a_shard_is_skipped_named_and_counted(
    shapes_folder, shards, tmp_path, caplog
):
    import shutil

    import run_mae_pretraining

    data = tmp_path / "shards"
    shutil.copytree(shards / "shards", data)
    with tarfile.open(data / "shard-000008.tar", "w") as archive:
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
        archive.add(broken, arcname="cracked/broken.png")
        archive.add(sorted((shapes_folder / "train" / "ring").glob("*.png"))[0], arcname="cracked/fine.png")
    arguments = streaming_arguments(data, tmp_path / "mae", shards / "mae")
    for argument in (
        "--teacher_name_or_path=" + str(shards / "mae"),
        "--target_layer=2",
        f"--config_overrides={SHAPES_STUDENT}",
    ):
        arguments.remove(argument)
    arguments += [
        "--config_overrides=image_size=32,patch_size=8,hidden_size=16,num_hidden_layers=1,num_attention_heads=2,"
        "intermediate_size=32,decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,"
        "decoder_intermediate_size=32",
        "--max_steps=30",  # 240 images per pass of 194: the broken one comes up at least once
        "--dataloader_num_workers=0",  # (warnings of worker processes do not reach caplog)
    ]
    arguments.remove("--max_steps=8")
    with caplog.at_level("WARNING"):
        metrics = run_mae_pretraining.main(arguments)
    assert metrics["skipped_train_images"] >= 1 and "shard-000008.tar/cracked/broken" in caplog.text
    assert "streamed training image(s) could not be read" in caplog.text
    assert json.loads((tmp_path / "mae" / "train_results.json").read_text())["skipped_train_images"] >= 1
    assert (tmp_path / "mae" / "model.safetensors").exists()


def test_without_dropping_unreadable_images_a_bad_streamed_image_stops_the_run_naming_it(shapes_folder):
    from g2sd_hf.data import evaluation_transform
    from g2sd_hf.streaming import StreamTransform

    good = {"path": str(sorted((shapes_folder / "train" / "ring").glob("*.png"))[0]), "bytes": None}
    bad = {"path": None, "bytes": b"\x89PNG\r\n\x1a\n cut short"}
    batch = {"image": [good, bad, good], "image_id": ["a", "shard-000003.tar/cracked/broken", "c"]}
    transform = evaluation_transform(32, **NORMALIZATION)
    skipped = StreamTransform(transform)(batch)
    assert skipped["image_id"] == ["a", "c"] and skipped["skipped_before"] == [0, 1]
    with pytest.raises(ValueError, match=r"The streamed image shard-000003.tar/cracked/broken: Cannot read image"):
        StreamTransform(transform, skip_unreadable=False)(batch)
