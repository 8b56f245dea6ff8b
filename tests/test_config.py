"""Config loading: YAML + dotted overrides -> validated Config, and one-line errors that name the key.

Unit tests, in process, no torch: they run in well under a second.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from dist_train.config import Config, load_config, parse_overrides
from dist_train.config.load import BUILTIN, dump_config, read_yaml
from dist_train.errors import UserError


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _error(*overrides: str, path: str | Path | None = None) -> str:
    """The UserError message for loading `path` (default: the built-in quickstart) with `overrides`."""
    with pytest.raises(UserError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, f"error message must be one line: {msg!r}"
    assert msg.strip() == msg and msg, msg
    return msg


# ------------------------------------------------------------------------------------ YAML loading


def test_builtin_quickstart_loads() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert (BUILTIN / "quickstart.yaml").is_file()
    assert cfg == load_config(BUILTIN / "quickstart.yaml")


def test_builtin_found_by_name_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("quickstart.yaml") == load_config(BUILTIN / "quickstart.yaml")
    assert load_config("configs/quickstart.yaml") == load_config(BUILTIN / "quickstart.yaml")


def test_empty_yaml_gives_schema_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "empty.yaml", ""))
    assert cfg == Config()
    assert cfg.optim.lr == 3e-3 and cfg.parallel.backend == "ddp"


def test_yaml_values_and_types(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.yaml", """
run: {name: exp1, dir: /somewhere}
train:
  steps: 7
  batch_size: 12
  grad_accum: 3
optim:
  name: sgd
  lr: 3e-4          # YAML 1.1 reads this as a string; the schema must still take it as a number
  weight_decay: 1.0e-2
telemetry:
  tensorboard: false
""")
    cfg = load_config(p)
    assert cfg.run.name == "exp1" and cfg.run.dir == "/somewhere"
    assert cfg.train.steps == 7 and cfg.train.batch_size == 12 and cfg.train.grad_accum == 3
    assert cfg.optim.name == "sgd"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(1e-2)
    assert cfg.telemetry.tensorboard is False
    # untouched sections keep their defaults
    assert cfg.model == Config().model


# ------------------------------------------------------------------------------------- overrides


def test_override_numbers() -> None:
    tree = parse_overrides(["optim.lr=3e-4", "optim.eps=1e-3", "a.b=1.5", "a.c=10", "a.d=-2e-5",
                            "a.e=1E-3", "a.f=.5", "a.g=1e5"])
    assert tree["optim"]["lr"] == pytest.approx(3e-4) and isinstance(tree["optim"]["lr"], float)
    assert tree["optim"]["eps"] == pytest.approx(1e-3) and isinstance(tree["optim"]["eps"], float)
    assert tree["a"] == {"b": 1.5, "c": 10, "d": pytest.approx(-2e-5), "e": pytest.approx(1e-3),
                         "f": 0.5, "g": 1e5}
    assert isinstance(tree["a"]["c"], int)


def test_override_bools_strings_lists_null() -> None:
    tree = parse_overrides(["x.t=true", "x.f=false", "x.s=hello", "x.q='3'", "x.l=[1, 2]",
                            "x.n=null", "x.empty=", "x.path=/a/b.bin", "x.word=release", "x.e=e"])
    assert tree["x"] == {"t": True, "f": False, "s": "hello", "q": "3", "l": [1, 2], "n": None,
                         "empty": "", "path": "/a/b.bin", "word": "release", "e": "e"}


def test_override_value_may_contain_equals() -> None:
    assert parse_overrides(["run.name=a=b"]) == {"run": {"name": "a=b"}}


def test_overrides_build_nested_tree_and_last_wins() -> None:
    tree = parse_overrides(["train.steps=5", "train.seed=3", "optim.lr=0.1", "train.steps=6"])
    assert tree == {"train": {"steps": 6, "seed": 3}, "optim": {"lr": 0.1}}


def test_overrides_apply_to_config() -> None:
    cfg = load_config(None, ["optim.lr=3e-4", "train.steps=50", "telemetry.tensorboard=false",
                             "run.name=abc", "data.max_bytes=200000"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 50
    assert cfg.telemetry.tensorboard is False
    assert cfg.run.name == "abc"
    assert cfg.data.max_bytes == 200000


def test_nested_merge_keeps_sibling_keys(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.yaml", "optim:\n  name: sgd\n  lr: 0.1\n  beta1: 0.5\ntrain:\n  steps: 9\n")
    cfg = load_config(p, ["optim.lr=0.2"])
    assert cfg.optim.name == "sgd" and cfg.optim.beta1 == 0.5  # siblings survive the override
    assert cfg.optim.lr == 0.2
    assert cfg.train.steps == 9  # other sections survive too


def test_override_can_add_section_missing_from_yaml(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.yaml", "train:\n  steps: 9\n")
    cfg = load_config(p, ["runtime.steady_timeout_s=3"])
    assert cfg.runtime.steady_timeout_s == 3.0 and cfg.train.steps == 9


# -------------------------------------------------------------------------------- error messages


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
    (["train.steps=2.5"], "train.steps: expected an integer, got 2.5"),
    (["telemetry.tensorboard=maybe"], "telemetry.tensorboard: expected true or false, got 'maybe'"),
    (["run.name=5"], "run.name: expected a string, got 5"),
    (["optim=3"], "optim: expected a mapping, got 3"),
])
def test_wrong_type(overrides: list[str], expected: str) -> None:
    assert _error(*overrides) == expected


@pytest.mark.parametrize("override", ["train.steps=true", "optim.lr=true"])
def test_bool_is_not_a_number(override: str) -> None:
    key = override.split("=")[0]
    assert _error(override).startswith(f"{key}: expected ")


@pytest.mark.parametrize("overrides, expected", [
    (["foo.bar=1"], "foo: unknown key"),
    (["optim.foo=1"], "optim.foo: unknown key"),
    (["optim.lr=0.1", "optim.learning_rate=0.1"], "optim.learning_rate: unknown key"),
])
def test_unknown_key(overrides: list[str], expected: str) -> None:
    assert _error(*overrides) == expected


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.yaml", "train:\n  steps: 3\n  stpes: 4\n")
    assert _error(path=p) == "train.stpes: unknown key"
    p = _write(tmp_path / "d.yaml", "trian:\n  steps: 3\n")
    assert _error(path=p) == "trian: unknown key"


@pytest.mark.parametrize("overrides, key, got", [
    (["model.name=rnn"], "model.name", "'rnn'"),
    (["parallel.backend=horovod"], "parallel.backend", "'horovod'"),
    (["optim.schedule=linear"], "optim.schedule", "'linear'"),
    (["data.name=imagenet"], "data.name", "'imagenet'"),
])
def test_literal_choices(overrides: list[str], key: str, got: str) -> None:
    msg = _error(*overrides)
    assert msg.startswith(f"{key}: expected one of ") and msg.endswith(f"got {got}")


def test_literal_choices_lists_the_options() -> None:
    assert _error("model.name=rnn") == ("model.name: expected one of 'gpt', 'llama', 'mlp', 'cnn', 'hf', 'basis_mlp' or "
                                        "'basis_fno', got 'rnn'")


@pytest.mark.parametrize("value", ["on", "off"])
def test_progress_on_off_override(value: str) -> None:
    # YAML 1.1 would read on/off as booleans; the override keeps the word the user typed
    assert load_config(None, [f"telemetry.progress={value}"]).telemetry.progress == value


@pytest.mark.parametrize("word, expected", [("no", False), ("yes", True), ("off", False), ("true", True)])
def test_bool_words_still_fill_bool_fields(word: str, expected: bool) -> None:
    assert load_config(None, [f"telemetry.tensorboard={word}"]).telemetry.tensorboard is expected


@pytest.mark.parametrize("value", ["on", "off"])
def test_progress_on_off_in_yaml_file(tmp_path: Path, value: str) -> None:
    p = _write(tmp_path / "c.yaml", f"telemetry:\n  progress: {value}\n")
    assert load_config(p).telemetry.progress == value


@pytest.mark.parametrize("overrides, expected", [
    (["train.steps=0"], "train.steps: input should be greater than or equal to 1, got 0"),
    (["optim.lr=-1"], "optim.lr: input should be greater than 0, got -1"),
])
def test_range_errors_name_the_key(overrides: list[str], expected: str) -> None:
    assert _error(*overrides) == expected


def test_n_head_must_divide_width() -> None:
    msg = _error("model.width=32", "model.n_head=3")
    assert msg == "model.n_head (3) must divide model.width (32)"


def test_gpt_with_digits() -> None:
    msg = _error("data.name=digits")
    assert msg.startswith("model.name: gpt needs a token data set")
    assert "digits" in msg


def test_mlp_needs_digits() -> None:
    assert _error("model.name=mlp") == ("model.name: mlp needs an image data set (digits or shapes32), "
                                        "not data.name=stdlib_bytes")


def test_token_bin_without_path() -> None:
    assert _error("data.name=token_bin") == "data.path: required when data.name is token_bin"


def test_batch_not_divisible_by_grad_accum() -> None:
    msg = _error("train.batch_size=10", "train.grad_accum=4")
    assert msg == "train.batch_size (10) must be divisible by train.grad_accum (4)"


@pytest.mark.parametrize("item", ["foo", "=1", "a..b=1", ".a=1", "a.=1"])
def test_malformed_override(item: str) -> None:
    assert _error(item) == f"override '{item}': expected key.path=value"


def test_override_into_a_scalar() -> None:
    assert _error("optim.lr=3", "optim.lr.x=1") == "override 'optim.lr.x=1': lr is not a section"


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_non_mapping_yaml(tmp_path: Path, text: str, kind: str) -> None:
    p = _write(tmp_path / "c.yaml", text)
    assert _error(path=p) == f"{p}: top level must be a mapping of sections, got {kind}"


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.yaml", "train:\n  steps: 3\n  batch_size: [1, 2\noptim:\n  lr: 0.1\n")
    msg = _error(path=p)
    assert msg.startswith(f"{p}: not valid YAML (line ")
    line = int(msg.rsplit("(line ", 1)[1].rstrip(")"))
    assert 3 <= line <= 5  # where the unclosed bracket is detected


def test_invalid_yaml_tab_indent(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.yaml", "train:\n\tsteps: 3\n")
    assert _error(path=p) == f"{p}: not valid YAML (line 2)"


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert _error(path=missing) == f"config file not found: {missing}"
    assert _error(path="/nonexistent/dir/cfg.yaml") == "config file not found: /nonexistent/dir/cfg.yaml"


def test_read_yaml_missing_raises_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_errors_have_no_pydantic_noise() -> None:
    # pydantic's own multi-line report (with URLs) must never reach the user
    for overrides in (["optim.lr=fast"], ["optim.foo=1"], ["model.name=rnn"], ["model.n_head=3"]):
        msg = _error(*overrides)
        assert "pydantic" not in msg and "errors.pydantic.dev" not in msg and "validation error" not in msg


# ----------------------------------------------------------------------------- schema conventions


def _models(model: type[BaseModel], seen: set) -> list[type[BaseModel]]:
    """`model` and every pydantic model reachable through its field annotations."""
    if model in seen:
        return []
    seen.add(model)
    out = [model]
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += _models(ann, seen)
            stack.extend(typing.get_args(ann))
    return out


def _component_options() -> list:
    """Every registered component's own options model (local.<method>.*, a data set's data.* keys,
    a model's model.* keys)."""
    from dist_train.registry import DATASETS, LOCAL_METHODS, MODELS

    return [own for reg in (LOCAL_METHODS, DATASETS, MODELS) for name in reg if (own := reg.get(name).options)]


def test_every_schema_field_has_a_description() -> None:
    models = _models(Config, set())
    assert len(models) >= 11  # Config + its ten sections
    models += [m for own in _component_options() for m in _models(own, set())]
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items()
               if not (isinstance(f.description, str) and f.description.strip())]
    assert not missing, f"fields without a description: {missing}"


def test_every_section_forbids_extra_keys() -> None:
    # `data`, `model` and `local` take their components' keys as extra keys, which the component's
    # own (strict) options model then validates: an unknown key is still refused, by name.
    from dist_train.config.schema import DataSection, LocalSection, ModelSection

    for m in _models(Config, set()) + [m for own in _component_options() for m in _models(own, set())]:
        allowed = m in (DataSection, LocalSection, ModelSection)
        assert m.model_config.get("extra") == ("allow" if allowed else "forbid"), m.__name__
    assert _error("data.max_byte=5") == "data.max_byte: not read by data.name=stdlib_bytes (its keys: max_bytes)"
    assert _error("model.n_heads=5") == "model.n_heads: not read by model.name=gpt (its keys: dropout, n_head, n_layer, width)"
    assert _error("local.man.evry=2") == "local.man.evry: unknown key"
    assert _error("local.foo=2") == "local.foo: unknown key"
    assert _error("local.dgl.x=2") == "local.dgl: method dgl has no options"


# --------------------------------------------------------------------------------- round trip


def test_resolved_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=3e-4", "train.steps=9", "run.name=rt", "data.name=token_bin",
                             "data.path=/x/train.bin", "telemetry.tensorboard=false", "optim.eps=1e-10",
                             "runtime.threads=1"])
    text = dump_config(cfg)
    p = _write(tmp_path / "config.yaml", text)
    again = load_config(p)
    assert again == cfg
    assert dump_config(again) == text


def test_default_dump_round_trips(tmp_path: Path) -> None:
    cfg = Config()
    p = _write(tmp_path / "config.yaml", dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid_on_two_ranks(path: Path) -> None:
    from dist_train.config.layout import check_layout

    check_layout(load_config(path), 2)
