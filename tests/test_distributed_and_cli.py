"""The 2-worker run writes what the 1-process run writes; the command line works as documented."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.cli import main, unknown_beam_options
from tests.conftest import ALL_ENCODERS, DEMO_PHOTOS, make_config, read_table, readme_gpu_command, run
from transforms import inference

MULTI_PROCESS = ("--direct_num_workers=2", "--direct_running_mode=multi_processing")


@pytest.mark.parametrize("served", [False, True], ids=["model per process", "large_model: one served model"])
def test_two_worker_run_writes_the_same_table(served, demo_run, tmp_path):
    demo_config, _ = demo_run
    catalog = {"format": "manifest", "path": demo_config.catalog.path, "text_fields": ["title", "description"],
               "label_field": "category", "fields": ["category"]}
    encoders = {name: dict(settings, large_model=served) for name, settings in ALL_ENCODERS.items()}
    config = make_config(tmp_path, catalog, encoders, table="demo")
    summary = run(config, beam_args=MULTI_PROCESS)
    single, multi = read_table(demo_config), read_table(config)
    assert summary["written"] == multi.num_rows == single.num_rows
    assert multi["id"].to_pylist() == single["id"].to_pylist()
    for column in ("title", "description", "category", "label", "text_fp", "image_fp", "color_fp"):
        assert multi[column].to_pylist() == single[column].to_pylist(), column
    for column in ("text_vec", "image_vec", "color_vec", "vector"):
        np.testing.assert_allclose(np.stack(multi[column].to_numpy(zero_copy_only=False)),
                                   np.stack(single[column].to_numpy(zero_copy_only=False)), atol=1e-5)


def test_query_like_returns_the_photo_first_as_json(demo_run, capsys):
    config, _ = demo_run
    code = main(["query", "--uri", config.output.uri, "--table", "demo", "--like", "chelsea", "-k", "3", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [r["id"] for r in results][0] == "chelsea"
    assert len(results) == 3 and results[0]["score"] > results[1]["score"] >= results[2]["score"]
    assert results[0]["title"] == "Chelsea the cat"


def test_query_text_and_image(demo_run, capsys):
    config, _ = demo_run
    main(["query", "--uri", config.output.uri, "--table", "demo", "--text", "a cup of coffee", "--json"])
    assert json.loads(capsys.readouterr().out)[0]["id"] == "coffee"
    table = read_table(config)
    rocket = next(r["image_uri"] for r in table.to_pylist() if r["id"] == "rocket")
    main(["query", "--uri", config.output.uri, "--table", "demo", "--image", rocket, "--json"])
    assert json.loads(capsys.readouterr().out)[0]["id"] == "rocket"


def test_run_command_and_bad_config_exit_codes(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("catalog: {format: nope, path: .}\nencoders: {c: {kind: color}}\noutput: {uri: x, table: t}\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "catalog.format 'nope' is unknown" in capsys.readouterr().err
    assert main(["query", "--uri", str(tmp_path), "--table", "missing", "--like", "x"]) == 2


def test_the_readme_dataflow_gpu_command_uses_only_beam_options():
    argv = readme_gpu_command()
    assert argv[:2] == ["catalog-embed", "run"]
    beam_args = [arg for arg in argv[2:] if arg.startswith("--") and not arg.startswith("--config")]
    assert len(beam_args) == 11 and unknown_beam_options(beam_args) == []
    assert unknown_beam_options(["--machine_typ=g2-standard-8"]) == ["--machine_typ=g2-standard-8"]


def test_large_model_stages_call_a_served_model_through_its_proxy(demo_run, tmp_path, monkeypatch):
    demo_config, _ = demo_run
    models = []
    real_encode = inference.ModalityModelHandler._encode

    def encode_and_note_the_model(self, model, *args):
        models.append(type(model).__name__)
        return real_encode(self, model, *args)

    monkeypatch.setattr(inference.ModalityModelHandler, "_encode", encode_and_note_the_model)
    encoders = {"text": dict(ALL_ENCODERS["text"], large_model=True),
                "color": dict(ALL_ENCODERS["color"], model_copies=2)}
    catalog = {"format": "manifest", "path": demo_config.catalog.path, "text_fields": ["title", "description"]}
    config = make_config(tmp_path, catalog, encoders, table="demo")
    assert run(config)["encoded"] == {"text": DEMO_PHOTOS, "color": DEMO_PHOTOS}
    assert set(models) == {"_AutoProxyWrapper"}                      # Beam's proxy to the model's own process
    served, local = read_table(config), read_table(demo_config)
    for column in ("text_vec", "color_vec"):
        np.testing.assert_allclose(np.stack(served[column].to_numpy(zero_copy_only=False)),
                                   np.stack(local[column].to_numpy(zero_copy_only=False)), atol=1e-5)
