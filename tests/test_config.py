"""Config loading and `--config.a.b=value` overrides: types are enforced, unknown keys are refused."""
import os

import pytest

from suti.config import ConfigError, load_config, split_overrides
from data_pipeline import registry as registry_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs", "toy.py")


def test_overrides_are_typed_and_applied():
  overrides, rest = split_overrides([
      "--config.model.image_size=32", "--config.train.lr", "1e-3", "--config.text.kind=t5",
      "--config.model.neighbor_attn_resolutions=(4, 8)", "--config.text.trainable=false", "--workdir", "w"])
  assert rest == ["--workdir", "w"]
  cfg = load_config(TOY, overrides)
  assert cfg.model.image_size == 32 and isinstance(cfg.model.image_size, int)
  assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
  assert cfg.text.kind == "t5"
  assert cfg.model.neighbor_attn_resolutions == (4, 8)
  assert cfg.text.trainable is False


def test_int_widens_to_float_and_scalar_to_tuple():
  cfg = load_config(TOY, [("train.lr", "1"), ("model.neighbor_token_resolutions", "8")])
  assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
  assert cfg.model.neighbor_token_resolutions == (8,)


def test_unknown_key_is_one_line_error_with_suggestion():
  with pytest.raises(ConfigError, match=r"unknown config key 'model.image_sise' \(did you mean 'model.image_size'\?\)"):
    load_config(TOY, [("model.image_sise", "32")])


@pytest.mark.parametrize("key,value", [("model.image_size", "big"), ("model.image_size", "3.5"),
                                       ("text.trainable", "7"), ("model.block_out_channels", "{'a': 1}")])
def test_wrong_type_is_refused(key, value):
  with pytest.raises(ConfigError, match=f"config key '{key}' expects"):
    load_config(TOY, [(key, value)])


def test_loaded_config_is_locked_against_new_keys():
  cfg = load_config(TOY)
  with pytest.raises(AttributeError):
    cfg.model.new_field = 1


def test_missing_config_file():
  with pytest.raises(ConfigError, match="config file not found"):
    load_config("configs/nope.py")


@pytest.mark.parametrize("name", ["toy.py", "sd15.py", "imagen64.py", "toy_suti.py", "toy_vae.py", "toy_latent.py",
                                  "toy_latent_suti.py"])
def test_every_config_documents_its_command(name):
  path = os.path.join(ROOT, "configs", name)
  cfg = load_config(path)
  assert cfg.train.get("kind", "diffusion") == "vae" or cfg.model.num_neighbors >= 0
  import ast
  doc = ast.get_docstring(ast.parse(open(path).read()))
  assert doc and "suti " in doc, f"{name} must say in its docstring how to run it"


def test_a_free_form_group_takes_a_dict_and_a_structured_group_refuses_one():
  icl = os.path.join(ROOT, "configs", "pipeline", "toy_icl.py")  # imports configs.pipeline.toy: nested import
  cfg = load_config(icl, [("runner.accelerator_resources", "{'TPU': 1}")])
  assert dict(cfg.runner.accelerator_resources) == {"TPU": 1}
  assert cfg.stages[-2:] == ("experts", "targets")
  with pytest.raises(ConfigError, match="is a group"):
    load_config(icl, [("targets.filter", "{'clip_i_threshold': 0.5}")])


def test_the_full_scale_pipeline_config_chains_raw_to_icl():
  from data_pipeline import stages
  cfg = load_config(os.path.join(ROOT, "configs", "pipeline", "web_icl.py"))
  planned = stages.plan_stages(cfg, stages.RunLayout(("x.tar",), "/tmp/unused"), registry_lib.default_registry())
  assert [p.stage.name for p in planned][-2:] == ["experts", "targets"]
  assert (cfg.experts.steps, cfg.experts.lr, cfg.experts.optimizer) == (500, 1e-5, "adafactor")  # SuTI's experts
