"""Config: YAML + overrides, unknown keys with suggestions, validation before any model loads."""

import pytest
import yaml

from instructkit.config import ConfigError, dump_config, load_config, parse_override

BASE = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(p, ["train.lr=3e-4", "lora.enabled=true", "lora.target_modules=[q_proj, v_proj]",
                          "data.max_length=128", "train.max_steps=5"])
    assert cfg.method == "sft" and cfg.train.lr == 3e-4 and cfg.lora.enabled
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_length == 128 and cfg.train.max_steps == 5
    assert cfg.model.trust_remote_code is False  # off unless asked


def test_unknown_key_suggests_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**BASE, "train": {"learning_rate": 1e-4, "gradient_accum": 2}}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "unknown key 'train.gradient_accum'" in msg and "Did you mean 'train.grad_accum'" in msg
    assert "unknown key 'train.learning_rate'" in msg and str(p) in msg


def test_misspelt_section_and_override():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*Did you mean 'train'"):
        load_config(raw=dict(BASE), overrides=["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.max_len'.*Did you mean 'data.max_length'"):
        load_config(raw=dict(BASE), overrides=["data.max_len=10"])


def test_names_from_other_tools_get_suggestions():
    with pytest.raises(ConfigError, match=r"Did you mean 'train.grad_accum'"):
        load_config(raw=dict(BASE), overrides=["train.gradient_accumulation_steps=4"])
    with pytest.raises(ConfigError, match=r"Did you mean 'data.max_length'"):
        load_config(raw=dict(BASE), overrides=["data.max_seq_length=4"])


def test_type_and_range_errors():
    with pytest.raises(ConfigError, match=r"'train.lr'"):
        load_config(raw=dict(BASE), overrides=["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"'data.train_on'"):
        load_config(raw=dict(BASE), overrides=["data.train_on=users"])
    with pytest.raises(ConfigError, match=r"missing required key 'model'"):
        load_config(raw={"data": {"train": "x"}})
    with pytest.raises(ConfigError, match="quantize_4bit needs lora.enabled"):
        load_config(raw=dict(BASE), overrides=["lora.quantize_4bit=true"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)
    # The safe loader refuses arbitrary Python objects.
    p.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_override_syntax():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=hello world") == (["a"], "hello world")
    with pytest.raises(ConfigError, match="not key=value"):
        parse_override("train.lr")


def test_dump_roundtrip(tmp_path):
    cfg = load_config(raw=dict(BASE), overrides=["train.betas=[0.9, 0.95]"])
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        load_config(f)


def test_readme_documents_every_config_key():
    from pathlib import Path

    from instructkit.config import SECTIONS, RunConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for key in RunConfig.model_fields:
        assert f"`{key}`" in readme or f"**{key}**" in readme, key
    for section, model in SECTIONS.items():
        for key in model.model_fields:
            assert f"`{key}`" in readme, f"{section}.{key} is not documented in README.md"
