import pytest

from quantlm import recipes
from quantlm.errors import QuantlmError
from quantlm.gptq.settings import GPTQSettings
from quantlm.paths import recipes_dir
from quantlm.quantize import QuantRecipe
from quantlm.specs import PRESETS

RECIPES = recipes_dir()
ALL_YAML = sorted(RECIPES.rglob("*.yaml"))


def test_every_preset_and_spectra_quant_recipe_has_a_yaml_twin():
    names = {p.stem for p in ALL_YAML}
    assert set(PRESETS) <= names
    assert {"quantlm-3bit", "quantlm-4bit", "quantlm-6bit", "quantlm-8bit"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_yaml_loads_and_round_trips(path, tmp_path):
    obj = recipes.load(path)
    again = tmp_path / path.name
    recipes.dump(obj, again)
    assert recipes.load(again) == obj
    assert recipes.dumps(recipes.load(again)) == recipes.dumps(obj)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_yaml_equals_preset(name):
    assert recipes.load(RECIPES / "presets" / f"{name}.yaml") == PRESETS[name]


def test_spectra_quant_recipes():
    for b, group in ((3, 128), (4, 128), (6, -1), (8, -1)):
        r = recipes.load(RECIPES / f"quantlm-{b}bit.yaml", expect=QuantRecipe)
        g, c = r.gptq, r.calibration
        assert (g.bits, g.group_size, g.sym, c.nsamples, c.seqlen, r.export.formats) == (
            b, group, True, 512, 2048, ("unpacked",))
        assert (g.act_order, g.damp, g.true_sequential, g.static_groups) == (True, 0.01, True, True)
        assert (g.method, g.transforms, g.mse) == ("gptq", (), False)  # the paper's GPTQ, nothing added


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_a_clear_error(tmp_path):
    with pytest.raises(QuantlmError, match="unknown key 'group'.*did you mean 'group_size'"):
        recipes.load(_write(tmp_path, "kind: quant\ngptq: {bits: 4, group: 128}\n"))


def test_wrong_type_is_a_clear_error(tmp_path):
    with pytest.raises(QuantlmError, match=r"r.yaml.gptq.bits: expected an integer, got '4'"):
        recipes.load(_write(tmp_path, "kind: quant\ngptq: {bits: '4'}\n"))
    with pytest.raises(QuantlmError, match="sym: expected true or false"):
        recipes.load(_write(tmp_path, "kind: quant\ngptq: {sym: 1}\n"))
    with pytest.raises(QuantlmError, match="unknown key 'seeds'"):  # seeds belong to the suite manifest
        recipes.load(_write(tmp_path, "kind: quant\ncalibration: {seeds: [0, 1]}\n"))


def test_values_are_validated(tmp_path):
    with pytest.raises(QuantlmError, match="outside 2..8"):
        recipes.load(_write(tmp_path, "kind: quant\ngptq: {bits: 9}\n"))
    with pytest.raises(QuantlmError, match="gptq format holds 2, 3, 4 or 8 bits"):
        recipes.load(_write(tmp_path, "kind: quant\ngptq: {bits: 6}\nexport: {formats: [gptq]}\n"))


def test_kind_is_required_and_checked(tmp_path):
    with pytest.raises(QuantlmError, match="'kind' key"):
        recipes.load(_write(tmp_path, "gptq: {bits: 4}\n"))
    with pytest.raises(QuantlmError, match="unknown recipe kind"):
        recipes.load(_write(tmp_path, "kind: quantize\n"))
    with pytest.raises(QuantlmError, match="is a model recipe, but a quant recipe is needed"):
        recipes.load(RECIPES / "presets" / "floatlm-99m.yaml", expect=QuantRecipe)


def test_override_is_type_checked():
    r = recipes.override(QuantRecipe(), {"gptq.bits": "3", "calibration.seed": "5"})
    assert r.gptq.bits == 3 and r.calibration.seed == 5
    with pytest.raises(QuantlmError, match="expected true or false"):
        recipes.override(QuantRecipe(), {"gptq.sym": "maybe"})


def test_recipe_hash_changes_with_settings():
    assert recipes.recipe_hash(QuantRecipe()) == recipes.recipe_hash(QuantRecipe())
    assert recipes.recipe_hash(QuantRecipe()) != recipes.recipe_hash(QuantRecipe(GPTQSettings(bits=3)))


def test_fixed_length_tuples_check_each_position():
    from quantlm.recipes import _coerce

    assert _coerce([1, 2.5], tuple[float, float], "x") == (1.0, 2.5)
    assert _coerce([1, "a"], tuple[int, str], "x") == (1, "a")
    with pytest.raises(QuantlmError, match=r"x\[1\]: expected a string"):
        _coerce([1, 2], tuple[int, str], "x")
    with pytest.raises(QuantlmError, match="expected 2 items"):
        _coerce([1], tuple[int, str], "x")
