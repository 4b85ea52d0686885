"""Settings: precedence of the layers, and errors that name the file, the key and the valid keys."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest

from speedslurm.errors import ConfigError
from speedslurm.settings.settings import describe, load_settings


@pytest.fixture
def user_cfg(tmp_path: Path) -> Path:
    return tmp_path / "config.yaml"


def test_precedence_defaults_configs_user_env_set_flags(user_cfg: Path) -> None:
    base = load_settings(profile="testbed", config_path=None, environ={})
    assert base.llama.ngl == 99  # packaged default (and configs/testbed.yaml agrees)
    assert base.cluster.name == "testbed"  # configs/testbed.yaml beats the default "default"
    assert base.origins["cluster.name"].endswith("testbed.yaml")

    user_cfg.write_text("llama:\n  parallel: 6\n  threads: 3\nrun:\n  poll_interval_s: 0.5\n")
    s = load_settings(profile="testbed", config_path=user_cfg, environ={})
    assert (s.llama.parallel, s.llama.threads) == (6, 3)
    assert s.origins["llama.parallel"] == str(user_cfg)

    env = {"SPEEDSLURM_LLAMA__PARALLEL": "7"}
    s = load_settings(profile="testbed", config_path=user_cfg, environ=env)
    assert s.llama.parallel == 7 and s.origins["llama.parallel"] == "env SPEEDSLURM_LLAMA__PARALLEL"
    assert s.llama.threads == 3  # the user file still applies below the env var

    s = load_settings(profile="testbed", config_path=user_cfg, environ=env, overrides=["llama.parallel=8"])
    assert s.llama.parallel == 8

    s = load_settings(profile="testbed", config_path=user_cfg, environ=env, overrides=["llama.parallel=8"],
                      cli={"llama.parallel": 9, "llama.threads": None})
    assert s.llama.parallel == 9 and s.llama.threads == 3  # an unset flag hides nothing


def test_user_config_from_env_var(user_cfg: Path) -> None:
    user_cfg.write_text("cluster:\n  partition: other\n")
    s = load_settings(profile="testbed", environ={"SPEEDSLURM_CONFIG": str(user_cfg)})
    assert s.cluster.partition == "other"


def test_unknown_key_names_file_key_and_valid_keys(user_cfg: Path) -> None:
    user_cfg.write_text("llama:\n  paralel: 4\n")
    with pytest.raises(ConfigError) as err:
        load_settings(profile="testbed", config_path=user_cfg, environ={})
    text = err.value.render()
    assert str(user_cfg) in text and "llama.paralel" in text and "parallel" in text
    assert err.value.exit_code == 2


def test_unknown_section_lists_sections(user_cfg: Path) -> None:
    user_cfg.write_text("clusterr:\n  partition: x\n")
    with pytest.raises(ConfigError) as err:
        load_settings(profile="testbed", config_path=user_cfg, environ={})
    assert "clusterr" in err.value.message and "cluster" in (err.value.fix or "")


def test_wrong_type_names_key_and_type(user_cfg: Path) -> None:
    user_cfg.write_text("llama:\n  parallel: lots\n")
    with pytest.raises(ConfigError) as err:
        load_settings(profile="testbed", config_path=user_cfg, environ={})
    assert "llama.parallel must be int" in err.value.message and str(user_cfg) in err.value.message


def test_yaml_syntax_error_gives_file_and_line(user_cfg: Path) -> None:
    user_cfg.write_text("llama:\n  parallel: 4\n  threads: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_settings(profile="testbed", config_path=user_cfg, environ={})
    assert f"{user_cfg}:" in err.value.message and "YAML syntax error" in err.value.message


def test_env_var_with_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(profile="testbed", environ={"SPEEDSLURM_LLAMA__NOPE": "1"})
    assert "SPEEDSLURM_LLAMA__NOPE" in err.value.message


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(profile="nosuch", environ={})
    assert "gorgonas" in (err.value.fix or "") and "testbed" in (err.value.fix or "")


def test_explicit_missing_user_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(profile="testbed", config_path=tmp_path / "nope.yaml", environ={})


def test_gorgonas_profile_lists_the_seed_nodes() -> None:
    s = load_settings(profile="gorgonas", environ={})
    assert sorted(s.cluster.nodes, key=lambda n: int(n[7:])) == [
        "gorgona1", "gorgona2", "gorgona3", "gorgona4", "gorgona5", "gorgona6", "gorgona7", "gorgona10"]
    assert s.cluster.nodes["gorgona10"].address == "192.168.62.40"
    assert s.cluster.nodes["gorgona1"].cuda_arch == "sm_89" and s.cluster.nodes["gorgona5"].cuda_arch == "sm_86"
    assert {n.usable_gib for n in s.cluster.nodes.values()} == {22}
    assert s.models["Q6_K_L"].files[0].endswith("-00001-of-00002.gguf") and len(s.models["Q6_K_L"].files) == 2


def test_describe_reports_origins() -> None:
    s = load_settings(profile="testbed", environ={}, overrides=["llama.parallel=5"])
    rows = {k: (v, o) for k, v, o in describe(s)}
    assert rows["llama.parallel"] == (5, "--set llama.parallel")
    assert rows["llama.ngl"][1] in ("default",) or rows["llama.ngl"][1].endswith(".yaml")


def test_unknown_profile_is_an_error_naming_the_profiles(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    with pytest.raises(ConfigError) as err:
        load_settings(profile="testbedd", environ=env)
    text = err.value.render()
    assert "unknown profile 'testbedd'" in text
    assert "gorgonas, local, testbed" in text
    assert err.value.exit_code == 2


def test_user_profiles_and_models_add_to_the_packaged_ones(tmp_path: Path) -> None:
    udir = tmp_path / "speedslurm"
    (udir / "profiles").mkdir(parents=True)
    (udir / "profiles" / "mylab.yaml").write_text("cluster:\n  name: mylab\n  partition: gpu\n")
    (udir / "profiles" / "testbed.yaml").write_text("llama:\n  parallel: 3\n")
    (udir / "models.yaml").write_text("models:\n  mine:\n    files: [/data/mine.gguf]\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path)}

    s = load_settings(profile="mylab", environ=env)
    assert (s.cluster.name, s.cluster.partition) == ("mylab", "gpu")
    assert s.origins["cluster.name"] == str(udir / "profiles" / "mylab.yaml")
    assert {"Q4_K_S", "Q6_K_L", "mine"} <= set(s.models)   # packaged registry plus the user's
    assert s.origins["models.mine.files"] == str(udir / "models.yaml")

    s = load_settings(profile="testbed", environ=env)       # the user's file layers over the packaged one
    assert s.cluster.name == "testbed" and s.llama.parallel == 3

    with pytest.raises(ConfigError) as err:
        load_settings(profile="nope", environ=env)
    assert "mylab" in err.value.render() and "testbed" in err.value.render()


def test_variables_with_a_meaning_of_their_own_are_not_settings() -> None:
    env = {"SPEEDSLURM_API_KEY": "sk-secret", "SPEEDSLURM_TEMPLATES_DIR": "/x"}
    s = load_settings(profile="testbed", environ=env)
    assert "sk-secret" not in repr(s.to_dict()) and s.cluster.name == "testbed"


@pytest.mark.parametrize(("yaml_text", "check"), [
    ("cluster:\n  nodes:\n    n1: {cuda_arch: 86}\n", lambda s: s.cluster.nodes["n1"].cuda_arch == "86"),
    ("llama:\n  compute_overhead_gib: 2\n", lambda s: s.llama.compute_overhead_gib == 2.0
     and isinstance(s.llama.compute_overhead_gib, float)),
    ("cluster:\n  exclude: n3\n", lambda s: s.cluster.exclude == ["n3"]),
    ("cluster:\n  exclude: null\n  nodes: null\n", lambda s: s.cluster.exclude == [] and s.cluster.nodes == {}),
    ("cluster:\n  sbatch: {comment: 5, exclusive: true}\n",
     lambda s: s.cluster.sbatch == {"comment": "5", "exclusive": True}),
], ids=["number-as-text", "int-as-float", "string-as-list", "null-as-empty", "sbatch-values"])
def test_values_are_converted_as_documented(user_cfg: Path, yaml_text: str, check: tp.Any) -> None:
    user_cfg.write_text(yaml_text)
    assert check(load_settings(profile="testbed", config_path=user_cfg, environ={}))


@pytest.mark.parametrize(("yaml_text", "problem", "fix"), [
    ("llama:\n  ngl: true\n", "llama.ngl must be int, not True", "set llama.ngl to a value of type int"),
    ("llama:\n  ngl: 2.5\n", "llama.ngl must be int, not 2.5", "llama.ngl"),
    ("llama:\n  rpc_cache: 'yes'\n", "llama.rpc_cache must be bool, not 'yes'", "llama.rpc_cache"),
    ("run:\n  poll_interval_s: false\n", "run.poll_interval_s must be float, not False", "run.poll_interval_s"),
    ("cluster:\n  exclude: [n3, true]\n", "cluster.exclude must be str, not True", "cluster.exclude"),
    ("cluster:\n  sbatch: {comment: [1]}\n", "cluster.sbatch.comment must be str | bool | None, not [1]",
     "cluster.sbatch.comment"),
    ("llama: 5\n", "llama must be a mapping, not 5", "key: value"),
    ("cluster:\n  nodes: [n1]\n", "cluster.nodes must be a mapping of names to entries", "name: {...}"),
    ("models:\n  m: {host: n1}\n", "models.m lacks required key(s) files", "add files"),
    ("models:\n  m: {files: [a.gguf], arch: {n_layer: 2}}\n", "models.m.arch lacks required key(s) n_head_kv, head_dim",
     "add n_head_kv, head_dim"),
    ("cluster:\n  nodes:\n    n1: {gpux: a}\n", "unknown key 'cluster.nodes.n1.gpux'",
     "valid keys in cluster.nodes.n1: address, gpu, cuda_arch, mem_gib, usable_gib"),
    ("cluster:\n  nodes:\n    true: {gpu: a}\n", "cluster.nodes has a name that is not text: True", "quote the name"),
], ids=["bool-for-int", "float-for-int", "text-for-bool", "bool-for-float", "list-item", "union", "section",
        "entries", "missing", "missing-nested", "unknown-in-entry", "name-not-text"])
def test_a_bad_value_names_the_key_the_file_and_the_fix(user_cfg: Path, yaml_text: str, problem: str,
                                                       fix: str) -> None:
    user_cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_settings(profile="testbed", config_path=user_cfg, environ={})
    assert err.value.message.startswith(f"{user_cfg}: {problem}"), err.value.message
    assert fix in (err.value.fix or "") and err.value.exit_code == 2


def test_a_bad_value_from_a_variable_or_a_flag_names_it() -> None:
    with pytest.raises(ConfigError, match=r"^env SPEEDSLURM_LLAMA__NGL: llama.ngl must be int, not 'many'$"):
        load_settings(profile="testbed", environ={"SPEEDSLURM_LLAMA__NGL": "many"})
    with pytest.raises(ConfigError, match=r"^flag run.poll_interval_s: run.poll_interval_s must be float"):
        load_settings(profile="testbed", environ={}, cli={"run.poll_interval_s": "soon"})


def test_a_slurm_time_and_a_leading_zero_stay_as_written_in_every_layer(user_cfg: Path) -> None:
    """YAML 1.1 reads 4:00:00 as 14400 (base 60) and 0123 as 83 (octal), which Slurm then took as minutes and as
    another account; the settings keep the text as written, in a file, a variable and --set alike."""
    user_cfg.write_text("cluster:\n  time: 4:00:00\n  account: 0123\n")
    s = load_settings(profile="testbed", config_path=user_cfg, environ={})
    assert (s.cluster.time, s.cluster.account) == ("4:00:00", "0123")
    s = load_settings(profile="testbed", config_path=None, environ={"SPEEDSLURM_CLUSTER__TIME": "2:00:00"},
                      overrides=["cluster.account=0777"])
    assert (s.cluster.time, s.cluster.account) == ("2:00:00", "0777")
    s = load_settings(profile="testbed", config_path=None, environ={},
                      overrides=["run.outage_s=1.5e3", "cluster.account=12e3"])
    assert (s.run.outage_s, s.cluster.account) == (1500.0, "12e3")  # a float has a dot; its exponent no sign


def test_an_alias_bomb_or_a_file_that_is_not_utf8_is_refused_at_once(user_cfg: Path) -> None:
    levels = ["a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")  # 9**8 values once expanded
    user_cfg.write_text("\n".join(levels) + "\ncluster:\n  sbatch: {x: *h}\n")
    with pytest.raises(ConfigError, match="expand to more than 100,000 values"):
        load_settings(profile="testbed", config_path=user_cfg, environ={})
    user_cfg.write_bytes(b"cluster:\n  account: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 23\)") as info:
        load_settings(profile="testbed", config_path=user_cfg, environ={})
    assert info.value.fix == "save it as UTF-8"
